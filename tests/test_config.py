import pytest

from megasparse import SparsityConfig


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"weights": "1:4"}, "weights"),
        ({"mask": "2d"}, "mask"),
        ({"gradient": "sgd"}, "gradient"),
        ({"backend": "cublas"}, "backend"),
        ({"mask_refresh_interval": 0}, "mask_refresh_interval"),
        ({"mask_refresh_interval": 2.5}, "mask_refresh_interval"),
        ({"srste_decay": -1.0}, "srste_decay"),
        ({"enabled": "yes"}, "enabled"),
        ({"nonfinite_weights": "ignore"}, "nonfinite_weights"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SparsityConfig.{field}"):
        SparsityConfig(**kwargs)


def test_prunes_weights_follows_enabled_and_weights():
    assert SparsityConfig().prunes_weights
    assert not SparsityConfig(enabled=False).prunes_weights
    assert not SparsityConfig(weights=None).prunes_weights


def test_later_changes_are_validated_and_rejected_values_leave_config_unchanged():
    cfg = SparsityConfig()
    cfg.enabled = False
    assert not cfg.prunes_weights
    with pytest.raises(ValueError, match="SparsityConfig.mask"):
        cfg.mask = "diagonal"
    assert cfg.mask == "1d"
