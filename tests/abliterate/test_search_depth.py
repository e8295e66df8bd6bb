"""--search_depth: the late (default, the reference's) space is unchanged; full reaches every layer."""

import optuna
import pytest

from abliterate.search.space import kernel_bounds, suggest_parameters
from abliterate.settings import AbliterateSettings, parse_settings
from foundation.errors import UserError
from tests.abliterate.test_study_name import name


def _draws(depth: str, num_layers: int = 8, n: int = 40):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    draws = []
    for _ in range(n):
        trial = study.ask()
        draws.append(suggest_parameters(trial, num_layers, ["attn", "mlp"], "global", depth))
        study.tell(trial, 0.0)
    return draws


def test_late_bounds_are_the_reference_space_and_full_bounds_cover_every_layer():
    assert kernel_bounds(8) == kernel_bounds(8, "late") == {"max_weight_position": (4.8, 7.0),
                                                            "min_weight_distance": (1.0, 4.8)}
    assert kernel_bounds(8, "full") == {"max_weight_position": (0.0, 7.0), "min_weight_distance": (1.0, 8.0)}
    # a 1-layer model keeps a non-empty range in both spaces
    for depth in ("late", "full"):
        for low, high in kernel_bounds(1, depth).values():
            assert high > low


def test_late_draws_never_reach_layer_0_and_full_draws_do():
    def reaches_first_layer(parameters):
        return any(k.max_weight_position - k.min_weight_distance < 0 for k in parameters.kernels.values())

    late, full = _draws("late"), _draws("full")
    assert all(4.8 <= k.max_weight_position <= 7.0 and k.min_weight_distance <= 4.8
               for p in late for k in p.kernels.values())
    assert not any(reaches_first_layer(p) for p in late)  # peak >= 4.8, reach <= 4.8: layer 0 is never edited
    assert any(k.max_weight_position < 4.8 for p in full for k in p.kernels.values())
    assert any(reaches_first_layer(p) for p in full)


def test_the_default_depth_draws_what_earlier_versions_drew():
    """Same seed, same parameters as before the option existed (the default search is unchanged)."""
    default = _draws("late", n=5)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for expected in default:
        trial = study.ask()
        assert suggest_parameters(trial, 8, ["attn", "mlp"], "global") == expected
        study.tell(trial, 0.0)


def test_a_bad_depth_is_a_user_error_naming_the_flag():
    with pytest.raises(UserError) as caught:
        parse_settings(["--model", "org/tiny-model", "--search_depth", "deep"])
    assert "--search_depth" in str(caught.value) and "full" in str(caught.value)
    with pytest.raises(UserError, match="--search_depth"):
        kernel_bounds(8, "deep")
    assert parse_settings(["--model", "org/tiny-model", "--search_depth", "full"]).search_depth == "full"
    assert AbliterateSettings(model="org/tiny-model").search_depth == "late"


def test_full_depth_names_its_own_study_and_late_keeps_the_old_name():
    assert name(search_depth="late") == name() == "abliterate-tiny-model-a7009e70bd73"
    assert name(search_depth="full") != name()
