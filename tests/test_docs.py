# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The bundle's docs agree with its configs: every knob has exactly one row where its workflow's knobs are listed,
no row names a key the config lacks, and every ``monai.bundle`` command of the docs names config files that exist,
a run or network id those files define, and overrides of ids they define."""

from __future__ import annotations

import ast
import configparser
import json
import re
import shlex
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
DOCS = ROOT / "bundle" / "docs"
README = DOCS / "README.md"

# options of the monai.bundle commands themselves; every other --key of a command overrides a config id
BUNDLE_OPTIONS = {"config_file", "meta_file", "logging_file", "args_file", "filepath", "ckpt_file", "key_in_ckpt",
                  "net_id", "run_id", "init_id", "final_id"}
# training outputs a command may name before they exist
PRODUCED = ROOT / "bundle" / "models"


def _config(name: str) -> dict:
    return ConfigParser.load_config_file(CONFIGS / name)


def _literal(value) -> bool:
    """Plain data written in the file: no expression, reference, macro or component."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, list):
        return all(_literal(v) for v in value)
    if isinstance(value, dict):
        return "_target_" not in value and all(_literal(v) for v in value.values())
    return False


def knobs(config: dict, base: set[str] = frozenset()) -> set[str]:
    """Top-level ids of ``config`` that are knobs: plain data, or an expression computed from other knobs (of this
    file or of ``base``) with the standard library and torch alone (paths, the device); not networks, data sets,
    loaders or anything else built by ``custom``."""
    keys = {k for k in config if not k.startswith(("_", "+")) and "#" not in k and k != "imports"}
    found = {k for k in keys if _literal(config[k])}
    while True:
        more = {
            k for k in keys - found
            if isinstance(config[k], str) and config[k][:1] in "$@" and "custom." not in config[k]
            and set(re.findall(r"@([\w#]+)", config[k])) <= found | set(base)
        }
        if not more:
            return found
        found |= more


def _text() -> str:
    return README.read_text(encoding="utf-8")


def table_after(marker: str) -> list[list[str]]:
    """The backticked names of the first cell of each row of the first table after ``marker``."""
    text = _text()
    assert text.count(marker) == 1, f"{marker!r} should occur once in {README.name}"
    rows, started = [], False
    for line in text.split(marker, 1)[1].splitlines():
        if line.startswith("|"):
            started = True
            first = line.split("|")[1]
            if not set(first.strip()) <= set("- ") and "`" in first:  # neither the rule nor a header cell
                rows.append(re.findall(r"`([^`]+)`", first))
        elif started:
            return rows
    return rows


def bullets_after(marker: str) -> list[list[str]]:
    """The backticked names before the first ': ' of each top-level bullet of the first list after ``marker``."""
    text = _text()
    assert text.count(marker) == 1
    rows = []
    for line in text.split(marker, 1)[1].splitlines()[1:]:
        if line.startswith("- `"):
            rows.append(re.findall(r"`([^`]+)`", line[2:].split(": ", 1)[0]))
        elif not line.startswith("  "):
            break
    return rows


def _check_one_row_each(rows: list[list[str]], required: set[str], defined: set[str], where: str) -> None:
    names = [name for row in rows for name in row]
    assert not (twice := sorted({n for n in names if names.count(n) > 1})), f"{where}: more than one row: {twice}"
    assert not (missing := sorted(required - set(names))), f"{where}: knobs without a row: {missing}"
    assert not (unknown := sorted(set(names) - defined)), f"{where}: rows of keys the config lacks: {unknown}"


def _ids(*files: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in files])
    return parser


def test_every_training_knob_has_exactly_one_row():
    train = _config("train.json")
    parser = _ids("train.json")
    rows = table_after("## Configuration knobs")
    defined = {name for row in rows for name in row if name in train or name in parser}
    _check_one_row_each(rows, knobs(train), defined | set(train), "train.json's knob table")
    assert {"init_path", "strong_fraction", "strong_datalist", "strong_weight"} <= {n for r in rows for n in r}


@pytest.mark.parametrize("overlay, marker", [
    ("slides.json", "`slides.json` (merged after train.json"),
    ("slide_mil.json", "`slide_mil.json` (merged after"),
])
def test_every_overlay_knob_has_exactly_one_row(overlay, marker):
    """An overlay's own knobs (those train.json does not define) are in its table, which names only its keys."""
    train, config = _config("train.json"), _config(overlay)
    base = knobs(train) | knobs(_config("slides.json"), knobs(train))
    own = knobs(config, base) - set(train)
    _check_one_row_each(table_after(marker), own, set(config), f"{overlay}'s knob table")


def test_every_inference_knob_has_exactly_one_bullet():
    inference = _config("inference.json")
    _check_one_row_each(bullets_after("Knobs (top of the file, all overridable"), knobs(inference), set(inference),
                        "inference.json's knob list")


def test_names_of_both_workflows_are_all_in_their_table():
    """The table of names both workflows use lists exactly the knobs of both (training: train.json and slides.json)."""
    train = _config("train.json")
    training = knobs(train) | knobs(_config("slides.json"), knobs(train))
    shared = training & knobs(_config("inference.json"))
    names = {n for row in table_after("Names in both workflows") for n in row}
    assert names == shared


def _commands() -> list[str]:
    """Every ``monai.bundle`` command of the docs: lines of code blocks (continuations joined) and inline code that
    name a ``--config_file`` (a bare ``python -m monai.bundle run`` in a sentence names the tool, not a command)."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if "-m monai.bundle" in line and line.lstrip().startswith(("python", "torchrun")):
                    found.append(line.strip())
        inline = re.sub(r"```.*?```", "", text, flags=re.S)
        found += [" ".join(span.split()) for span in re.findall(r"`((?:python|torchrun)[^`]*-m monai\.bundle[^`]*)`",
                                                                  inline)]
    return [command for command in found if "--config_file" in command]


COMMANDS = _commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 20
    assert any("run training" in c and "cpu_train.json" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_bundle_command_names_what_exists(command):
    tokens = shlex.split(command)
    tokens = tokens[tokens.index("monai.bundle") + 1:]
    subcommand, tokens = tokens[0], tokens[1:]
    assert subcommand in {"run", "ckpt_export", "verify_net_in_out"}, subcommand
    target = tokens.pop(0) if tokens and not tokens[0].startswith("--") else "run"
    options = {}
    while tokens:
        key = tokens.pop(0)
        assert key.startswith("--"), f"unexpected {key!r}"
        key, _, value = key[2:].partition("=")
        options[key] = value or tokens.pop(0)
    files = options["config_file"]
    files = ast.literal_eval(files) if files.startswith("[") else [files]
    for name in files:
        assert (ROOT / name).is_file(), name
    if "meta_file" in options:
        meta = ROOT / options["meta_file"]
        assert meta.is_file() or meta.parent == PRODUCED, options["meta_file"]
    parser = ConfigParser()
    parser.read_config([str(ROOT / name) for name in files])
    assert target in parser, f"{target!r} is not an id of {files}"
    assert not (unknown := [k for k in options if k not in BUNDLE_OPTIONS and k not in parser]), unknown


def test_the_package_version_is_the_bundle_version():
    """setup.cfg's version follows metadata.json's (which every checkpoint records as its bundle_version)."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert setup["metadata"]["version"] == meta["version"] and meta["version"] in meta["changelog"]
