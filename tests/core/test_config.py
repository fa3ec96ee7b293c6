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
        ({"mask_refresh_interval": True}, "mask_refresh_interval"),
        ({"srste_decay": "0.1"}, "srste_decay"),
        ({"srste_decay": float("inf")}, "srste_decay"),
        ({"srste_decay": float("nan")}, "srste_decay"),
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


def test_srste_decay_given_as_text_names_the_fix():
    fix = r"srste_decay must be a finite number.*'0.1' \(str\).*pass a float"
    with pytest.raises(ValueError, match=fix):
        SparsityConfig(srste_decay="0.1")
    assert SparsityConfig(srste_decay=1).srste_decay == 1  # an int is a fine number


@pytest.mark.parametrize("field", ["srste_decay", "masked_decay_factor"])
def test_decay_coefficients_follow_one_rule(field):
    """Both per-step decay terms take a finite real number >= 0 and refuse the rest alike."""
    for bad in (float("inf"), float("-inf"), float("nan"), True, False, "0.1", -1.0, None):
        with pytest.raises(ValueError, match=f"SparsityConfig.{field} must be a finite number"):
            SparsityConfig(**{field: bad})
    cfg = SparsityConfig()
    with pytest.raises(ValueError, match=f"SparsityConfig.{field}"):
        setattr(cfg, field, float("inf"))  # later changes too
    for good in (0, 1, 0.0, 2e-4, 6e-5):
        assert getattr(SparsityConfig(**{field: good}), field) == good


def test_misspelt_field_is_refused_with_the_valid_names():
    cfg = SparsityConfig()
    with pytest.raises(AttributeError, match=r"no field 'weigths'.*'weights'"):
        cfg.weigths = None
    assert cfg.weights == "2:4" and not hasattr(cfg, "weigths")
    cfg.weights = None  # the real field still works
    assert not cfg.prunes_weights


@pytest.mark.parametrize("activations", [None, "2:4", "64:2:4"])
def test_activation_wgrad_needs_a_compacted_activation(activations):
    with pytest.raises(ValueError, match="activation_wgrad='64:4:8'.*M >= 8"):
        SparsityConfig(activations=activations, activation_wgrad="64:4:8")
    assert SparsityConfig(
        activations="64:4:16", activation_wgrad="64:4:8"
    ).activation_wgrad_pattern == (64, 4, 8)


@pytest.mark.parametrize(
    "extra,match",
    [
        (dict(activation_wgrad="2:4"), "must keep 4 of every M >= 8 tokens"),
        (dict(activation_wgrad="64:2:4"), "must keep 4 of every M >= 8 tokens"),
        (dict(activation_wgrad="64:4:8", wgrad_sparsity="mvue"), "choose one"),
        (dict(activation_wgrad="64:4:8", fp8="hybrid"), "FP8 path's weight-gradient GEMMs"),
    ],
)
def test_activation_wgrad_refuses_what_it_cannot_run(extra, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(activations="64:4:16", **extra)
