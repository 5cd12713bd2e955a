import numpy as np
import pytest

from landcover.data.schema import IGNORE_INDEX, ClassSchema
from tests.conftest import compose_train


def chesapeake4() -> ClassSchema:
    cfg = compose_train("data=synthetic")
    return ClassSchema.from_config(cfg.data.schema)


def test_lookup_table_maps_codes_to_classes_and_ignores_nodata():
    schema = chesapeake4()
    lut = schema.lookup_table()
    assert schema.names == ["water", "tree_canopy", "low_vegetation", "barren_impervious"]
    assert [lut[c] for c in (1, 2, 3, 4, 5, 6)] == [0, 1, 2, 3, 3, 3]
    assert lut[15] == IGNORE_INDEX
    assert lut[0] == IGNORE_INDEX  # unknown codes never become a target


def test_tutorial_schema_keeps_ignored_class_channel():
    cfg = compose_train("data=synthetic", "data/schema=tutorial_5label")
    schema = ClassSchema.from_config(cfg.data.schema)
    assert schema.num_classes == 5
    assert schema.scored_classes == [1, 2, 3, 4]
    lut = schema.lookup_table()
    assert lut[0] == IGNORE_INDEX and lut[15] == IGNORE_INDEX
    assert [lut[c] for c in (1, 2, 3, 4, 5, 6)] == [1, 2, 3, 4, 4, 4]


def test_unknown_codes_are_listed():
    assert chesapeake4().unknown_codes(np.array([1, 3, 7, 200, 15])) == [7, 200]


def test_duplicate_code_is_rejected():
    with pytest.raises(ValueError, match="code 2 is claimed by both"):
        ClassSchema.from_config(
            {
                "name": "bad",
                "classes": [
                    {"name": "a", "color": "#000000", "codes": [1, 2]},
                    {"name": "b", "color": "#ffffff", "codes": [2]},
                ],
            }
        )


def test_palette_and_class_lookup():
    schema = chesapeake4()
    assert schema.rgb_palette().shape == (4, 3)
    assert tuple(schema.rgb_palette()[0]) == (0, 0, 255)
    assert schema.class_indices(["water", "barren_impervious"]) == [0, 3]
    with pytest.raises(ValueError, match="no class named"):
        schema.class_indices(["lava"])
