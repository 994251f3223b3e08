"""The core's seven optimizers against torch.optim: same start, same gradients, every step.

The C++ updates repeat torch.optim's single-tensor (foreach=False) code op for op with its
default hyper-parameters, so on one machine the two agree to the last bit; 1e-5 is the
contract the tests hold them to. Needs the built extension (dicebox._core).
"""

import numpy as np
import pytest
import torch

from dicebox import _core

TORCH_OPTIMIZERS = {
    "adadelta": torch.optim.Adadelta,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}
# Small to large, up to the genome's maximum of 10.
LEARNING_RATES = [1e-3, 0.05, 1.0, 10.0]
STEPS = 10
# Odd, so torch's vectorised loops and their scalar tails both run.
SIZE = 37


def random_problem(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = rng.standard_normal(SIZE).astype(np.float32)
    # Gradients over several orders of magnitude, some exactly zero.
    scale = 10.0 ** rng.integers(-3, 2, size=(STEPS, SIZE))
    grads = (rng.standard_normal((STEPS, SIZE)) * scale).astype(np.float32)
    grads[rng.random((STEPS, SIZE)) < 0.1] = 0.0
    return init, grads


def torch_trace(name: str, lr: float, init: np.ndarray, grads: np.ndarray) -> np.ndarray:
    param = torch.tensor(init, requires_grad=True)
    optimizer = TORCH_OPTIMIZERS[name]([param], lr=lr, foreach=False)
    trace = []
    for grad in grads:
        param.grad = torch.tensor(grad)
        optimizer.step()
        trace.append(param.detach().numpy().copy())
    return np.stack(trace)


@pytest.mark.parametrize("lr", LEARNING_RATES)
@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
def test_every_step_matches_torch(name: str, lr: float) -> None:
    seed = sorted(TORCH_OPTIMIZERS).index(name) * 100 + LEARNING_RATES.index(lr)
    init, grads = random_problem(seed)

    ours = _core.optimizer_trace(name, lr, init, grads)
    expected = torch_trace(name, lr, init, grads)

    assert ours.dtype == np.float32
    assert ours.shape == (STEPS, SIZE)
    for step in range(STEPS):
        np.testing.assert_allclose(
            ours[step], expected[step], atol=1e-5, rtol=1e-5, err_msg=f"{name} step {step + 1}"
        )


def test_unknown_name_is_refused() -> None:
    init, grads = random_problem(0)
    with pytest.raises(ValueError, match="optimizer"):
        _core.optimizer_trace("adamw", 0.1, init, grads)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_learning_rate_is_refused(lr: float) -> None:
    init, grads = random_problem(0)
    with pytest.raises(ValueError, match="optimizer.learning_rate"):
        _core.optimizer_trace("adam", lr, init, grads)
