"""Hook-captured residuals equal output_hidden_states; directions are difference of means."""

import pytest
import torch

from abliterate.architectures import discover
from abliterate.directions import interpolated_direction, normalize, refusal_directions
from abliterate.residuals import Residuals, capture_last_token_residuals
from tests.tiny_models import dense_llama, fused_moe, nemotron_h_hybrid

SEQUENCES = [[1, 5, 7, 9, 11], [3, 4, 5], [8, 8, 9, 10, 2, 3, 4]]


def _final_norm(model):
    return getattr(model.model, "norm", None) or getattr(model.model, "norm_f")


@pytest.mark.parametrize("build", [dense_llama, fused_moe, nemotron_h_hybrid])
def test_hooks_equal_output_hidden_states_with_left_padding_and_batches(build):
    model = build()
    architecture = discover(model)
    residuals = capture_last_token_residuals(model, architecture.layers, SEQUENCES, pad_id=0, batch_size=2)
    assert residuals.values.shape == (3, architecture.num_layers + 1, 64)
    assert residuals.values.dtype == torch.float32 and residuals.values.device.type == "cpu"
    with torch.no_grad():
        for row, sequence in enumerate(SEQUENCES):
            hidden = model(torch.tensor([sequence]), output_hidden_states=True).hidden_states
            reference = torch.stack([state[0, -1] for state in hidden])
            # transformers applies the final norm to its last entry; the hooks keep the raw residual.
            torch.testing.assert_close(residuals.values[row, :-1], reference[:-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(_final_norm(model)(residuals.values[row, -1]), reference[-1], atol=1e-5, rtol=1e-5)


def test_nonfinite_residuals_are_reported_by_index():
    values = torch.zeros(4, 3, 8)
    values[1, 2, 0] = float("nan")
    values[3, 2, 5] = float("inf")
    values[0, 0, 0] = float("nan")
    assert Residuals(values).nonfinite_layers() == {0: 1, 2: 2}


def test_difference_of_means_direction_and_projection():
    generator = torch.Generator().manual_seed(0)
    harmless = torch.randn(50, 3, 16, generator=generator) + 2.0
    harmful = harmless + torch.tensor([1.0] + [0.0] * 15)
    directions = refusal_directions(harmful, harmless)
    torch.testing.assert_close(directions[1], torch.tensor([1.0] + [0.0] * 15))
    projected = refusal_directions(harmful, harmless, projected=True)
    harmless_unit = normalize(harmless.mean(0))
    assert torch.allclose((projected * harmless_unit).sum(-1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(projected.norm(dim=-1), torch.ones(3))


def test_interpolated_direction_lies_between_neighbours():
    directions = torch.eye(4)[:3]  # residual index i -> unit vector e_i
    torch.testing.assert_close(interpolated_direction(directions, 1.0), directions[1])
    halfway = interpolated_direction(directions, 0.5)
    torch.testing.assert_close(halfway, normalize(torch.tensor([1.0, 1.0, 0.0, 0.0])))
    with pytest.raises(ValueError):
        interpolated_direction(directions, 2.5)


def test_directions_file_is_never_left_truncated(tmp_path, monkeypatch):
    """A kill while the study's directions file is written must not leave a file every resume fails to load."""
    from safetensors.torch import load_file, save_file

    from abliterate import direction_store

    path = tmp_path / "study" / "x.directions.safetensors"
    directions = torch.randn(7, 64)

    def killed_mid_write(tensors, filename):
        with open(filename, "wb") as handle:
            handle.write(b"\x08\x00\x00")  # the first bytes of a header, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(direction_store, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        direction_store.save_directions_atomically(directions, path)
    assert list(path.parent.iterdir()) == [], "neither the final nor the temporary file may remain"

    monkeypatch.setattr(direction_store, "save_file", save_file)
    direction_store.save_directions_atomically(directions, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    torch.testing.assert_close(load_file(str(path))["refusal_directions"], directions)
