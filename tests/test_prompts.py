import itertools

import pytest

from breastgen.errors import BreastGenError
from breastgen.prompts import AREAS, DENSITIES, area_class, build_prompt, density_word, parse_prompt, vendor_word


def test_canonical_prompt_text():
    assert build_prompt("Siemens", "cc", "C", "big") == "a siemens mammogram in CC view with high density and big area"
    assert build_prompt() == "a mammogram"
    assert build_prompt(view="MLO") == "a mammogram in MLO view"
    assert build_prompt(area="small") == "a mammogram with small area"


@pytest.mark.parametrize("vendor,view,density,area", itertools.product(
    [None, "hologic"], [None, "CC", "MLO"], [None, *DENSITIES], [None, *AREAS]))
def test_build_parse_roundtrip_with_any_attribute_omitted(vendor, view, density, area):
    p = build_prompt(vendor, view, density, area)
    assert parse_prompt(p).as_dict() == {"vendor": vendor, "view": view, "density": density, "area": area}


def test_parse_accepts_mame_area_first_order_and_case():
    a = parse_prompt("A Hologic mammogram in mlo view with Small area and Very Low density.")
    assert (a.vendor, a.view, a.density, a.area) == ("hologic", "MLO", "very low", "small")


@pytest.mark.parametrize("prompt,needle", [
    ("a canon mammogram", "'siemens'"),
    ("a mammogram in AP view", "'CC', 'MLO'"),
    ("a mammogram with huge area", "'small', 'medium', 'big'"),
    ("a mammogram with extreme density", "'very low', 'low', 'high', 'very high'"),
    ("a photo of a cat", "expected"),
    ("a mammogram with high density and low density", "twice"),
])
def test_unknown_words_list_the_allowed_ones(prompt, needle):
    with pytest.raises(BreastGenError) as e:
        parse_prompt(prompt)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_birads_and_area_classes():
    assert [density_word(x) for x in "ABCD"] == list(DENSITIES)
    assert density_word("DENSITY C") == "high" and density_word(2) == "low"
    with pytest.raises(BreastGenError, match="allowed"):
        density_word("E")
    assert [area_class(r) for r in (0.0, 0.399, 0.4, 0.599, 0.6, 1.0)] == ["small", "small", "medium", "medium",
                                                                          "big", "big"]
    with pytest.raises(BreastGenError):
        area_class(1.5)


def test_vendor_from_dicom_manufacturer():
    assert vendor_word("HOLOGIC, Inc.") == "hologic"
    assert vendor_word("SIEMENS") == "siemens"
    assert vendor_word("GE MEDICAL SYSTEMS") == "ge"
    assert vendor_word("Lorad, A Hologic Company") == "hologic"
    assert vendor_word("Unknown Corp") is None and vendor_word(None) is None
    with pytest.raises(BreastGenError, match="vendor"):
        build_prompt(vendor="acme")
    assert build_prompt(vendor="acme", vendors=["acme"]) == "a acme mammogram"
