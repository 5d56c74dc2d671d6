from .asap_xml import write_asap_xml
from .pyramid_tiff import write_pyramid
