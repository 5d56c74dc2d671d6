"""ASAP XML reading and rasterisation against hand-computed pixel counts."""

import numpy as np
import pytest

from custom.data.annotations import EXCLUDED, TUMOUR, rasterize_annotations, read_asap_xml


def _annotation(name, group, points, kind="Polygon"):
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in points)
    attributes = f'Name="{name}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58"'
    return f"<Annotation {attributes}><Coordinates>{coords}</Coordinates></Annotation>"


def _write_xml(path, *annotations):
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(annotations)
        + '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000"/></AnnotationGroups>'
        "</ASAP_Annotations>"
    )
    return path


@pytest.fixture
def xml_path(tmp_path):
    """Tumour rectangle x [8, 40) y [4, 20) with a hole x [16, 24) y [8, 12), and a tumour triangle near x = 100."""
    # Coordinates are listed out of Order on purpose: the reader must sort them.
    rect = [(2, (40, 20)), (0, (8, 4)), (1, (40, 4)), (3, (8, 20))]
    hole = [(0, (16, 8)), (1, (24, 8)), (2, (24, 12)), (3, (16, 12))]
    triangle = [(0, (100, 0)), (1, (134.5, 0)), (2, (100, 34.5))]
    return _write_xml(
        tmp_path / "slide.xml",
        _annotation("Annotation 0", "_0", rect),
        _annotation("Annotation 1", "_2", hole, kind="Rectangle"),
        _annotation("Annotation 2", "Tumor", triangle, kind="Spline"),
    )


def test_read_sorts_by_order_and_maps_groups(xml_path):
    annotations = read_asap_xml(xml_path)
    assert [a.value for a in annotations] == [TUMOUR, EXCLUDED, TUMOUR]
    assert [a.group for a in annotations] == ["_0", "_2", "Tumor"]
    np.testing.assert_array_equal(annotations[0].xy, [[8, 4], [40, 4], [40, 20], [8, 20]])
    assert annotations[2].xy[1, 0] == 134.5


def test_rectangle_with_exclusion_at_downsample_1(xml_path):
    mask = rasterize_annotations(read_asap_xml(xml_path), location_xy=(0, 0), size_wh=(64, 32), downsample=1)
    assert mask.shape == (32, 64) and mask.dtype == np.uint8
    assert (mask == EXCLUDED).sum() == 8 * 4
    assert (mask == TUMOUR).sum() == 32 * 16 - 8 * 4
    # (x, y) -> (row, col): the rectangle spans rows 4..19 and columns 8..39.
    expected = np.zeros((32, 64), np.uint8)
    expected[4:20, 8:40] = TUMOUR
    expected[8:12, 16:24] = EXCLUDED
    np.testing.assert_array_equal(mask, expected)


def test_rectangle_with_exclusion_at_downsample_4(xml_path):
    mask = rasterize_annotations(read_asap_xml(xml_path), location_xy=(0, 0), size_wh=(16, 8), downsample=4)
    expected = np.zeros((8, 16), np.uint8)
    expected[1:5, 2:10] = TUMOUR  # level-0 y [4, 20) / 4 = rows [1, 5); x [8, 40) / 4 = cols [2, 10)
    expected[2:3, 4:6] = EXCLUDED
    np.testing.assert_array_equal(mask, expected)


def test_triangle_counts_with_offset_location(xml_path):
    annotations = read_asap_xml(xml_path)
    # Pixel centres (c + 0.5, r + 0.5) lie inside x + y < 34.5 when c + r <= 33: 1 + 2 + ... + 34 pixels.
    full = rasterize_annotations(annotations, location_xy=(100, 0), size_wh=(40, 40), downsample=1)
    assert (full == TUMOUR).sum() == 34 * 35 // 2
    assert full[0, 33] == TUMOUR and full[0, 34] == 0 and full[33, 0] == TUMOUR and full[1, 33] == 0
    # At downsample 4 the hypotenuse is u + v < 8.625, so c + r <= 7: 36 pixels.
    coarse = rasterize_annotations(annotations, location_xy=(100, 0), size_wh=(10, 10), downsample=4)
    assert (coarse == TUMOUR).sum() == 36 and EXCLUDED not in coarse


def test_region_outside_every_annotation_is_background(xml_path):
    mask = rasterize_annotations(read_asap_xml(xml_path), location_xy=(1000, 1000), size_wh=(8, 8), downsample=2)
    assert not mask.any()


def test_malformed_xml_names_the_file(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<ASAP_Annotations><Annotations><Annotation")
    with pytest.raises(ValueError, match=r"broken\.xml.*malformed"):
        read_asap_xml(path)


def test_missing_coordinates_names_file_and_annotation(tmp_path):
    path = _write_xml(tmp_path / "short.xml", _annotation("lonely", "_0", [(0, (1, 1)), (1, (5, 5))]))
    with pytest.raises(ValueError, match=r"short\.xml.*'lonely'.*2 coordinate"):
        read_asap_xml(path)
    path = tmp_path / "nox.xml"
    path.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="_1"><Coordinates>'
        '<Coordinate Order="0" Y="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>'
    )
    with pytest.raises(ValueError, match=r"nox\.xml.*Order/X/Y"):
        read_asap_xml(path)


def test_unknown_group_is_an_error_unless_mapped(tmp_path):
    square = [(0, (0, 0)), (1, (4, 0)), (2, (4, 4)), (3, (0, 4))]
    path = _write_xml(tmp_path / "groups.xml", _annotation("x", "None", square))
    with pytest.raises(ValueError, match=r"groups\.xml.*group 'None'"):
        read_asap_xml(path)
    (annotation,) = read_asap_xml(path, tumour_groups=("None",))
    assert rasterize_annotations([annotation], (0, 0), (4, 4)).sum() == 16


def test_round_trip_with_the_asap_writer(tmp_path):
    from custom.writers.asap_xml import write_asap_xml

    tumour = np.array([[8, 4], [40, 4], [40, 20], [8, 20]], float)
    hole = np.array([[16, 8], [24, 8], [24, 12], [16, 12]], float)
    path = write_asap_xml(tmp_path / "written.xml", [tumour, hole], groups=["_1", "_2"])
    annotations = read_asap_xml(path)
    assert [a.value for a in annotations] == [TUMOUR, EXCLUDED]
    np.testing.assert_array_equal(annotations[0].xy, tumour)
    np.testing.assert_array_equal(annotations[1].xy, hole)
