"""RGP (method=rgp): carriers, reconstruction, per-sample carrier gradients and joint clipping
against brute force, noise placement, weight restoration, end-to-end runs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpexp import accounting
from dpexp.clipping import MODES, clip_and_sum, make_engine
from dpexp.errors import ConfigError
from dpexp.methods.rgp import CARRIER_SOURCES, RGP, carriers, reconstruct
from dpexp.privacy.step import GradientStep
from dpexp.train import run
from dpexp.validate import validate
from tests import reference


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def orthonormal_columns(matrix: torch.Tensor) -> bool:
    eye = torch.eye(matrix.shape[-1]).expand(*matrix.shape[:-2], -1, -1)
    return torch.allclose(matrix.mT @ matrix, eye, atol=1e-12)


def small_net() -> nn.Module:
    """Grouped, strided, padded, dilated convs, a hidden Linear and a classifier."""
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(6, 8, 3, padding=2, dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 12),
        nn.Tanh(),
        nn.Linear(12, 3),
    )


def attach(model: nn.Module, **options) -> RGP:
    method = RGP(**{"rank": 2, "warmup_steps": 0, **options})
    method.setup_method(model, None)
    return method


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 4, 8, 8), torch.randint(0, 3, (n,))


# -- carriers and reconstruction --------------------------------------------------------------
def test_carriers_are_orthonormal_and_span_a_low_rank_matrix(float64):
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(3, 9, 2) @ torch.randn(3, 2, 7)  # a batch of three rank-2 matrices
    L, R = carriers(matrix, rank=2, generator=g)
    assert L.shape == (3, 9, 2) and R.shape == (3, 2, 7)
    assert orthonormal_columns(L) and orthonormal_columns(R.mT)
    # rank(matrix) ≤ r: the carriers span exactly its column and row spaces
    torch.testing.assert_close(L @ L.mT @ matrix, matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix @ R.mT @ R, matrix, rtol=0, atol=1e-12)
    # a rank above min(p, d) is capped
    L, R = carriers(torch.randn(4, 3), rank=8, generator=g)
    assert L.shape == (4, 3) and R.shape == (3, 3) and orthonormal_columns(L)


def test_power_iterations_find_the_top_singular_subspace(float64):
    u, _ = torch.linalg.qr(torch.randn(20, 20))
    v, _ = torch.linalg.qr(torch.randn(15, 15))
    s = torch.tensor([10.0, 8.0] + [0.1] * 13)
    matrix = u[:, :15] @ torch.diag(s) @ v.T
    L, R = carriers(matrix, rank=2, power_iterations=4, generator=torch.Generator().manual_seed(0))
    top_left, top_right = u[:, :2], v[:, :2]
    torch.testing.assert_close(L @ L.T, top_left @ top_left.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(R.T @ R, top_right @ top_right.T, rtol=0, atol=1e-6)


def test_zero_target_gets_seeded_random_carriers(float64):
    L1, R1 = carriers(torch.zeros(2, 5, 4), 3, generator=torch.Generator().manual_seed(7))
    L2, R2 = carriers(torch.zeros(2, 5, 4), 3, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(L1).all() and orthonormal_columns(L1) and orthonormal_columns(R1.mT)
    assert torch.equal(L1, L2) and torch.equal(R1, R2)  # seeded: reproducible
    assert not torch.allclose(L1[0], L1[1])  # fresh random directions, not a fixed basis


def test_reconstruct_is_the_projection_of_the_gradient(float64):
    G = torch.randn(7, 5)
    L, R = carriers(torch.randn(7, 5), 2, generator=torch.Generator().manual_seed(0))
    grad_L, grad_R = G @ R.T, L.T @ G
    PL, PR = L @ L.T, R.T @ R
    expected = PL @ G + G @ PR - PL @ G @ PR
    torch.testing.assert_close(reconstruct(grad_L, grad_R, L, R), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(reconstruct(grad_L, None, L, R), G @ PR, rtol=0, atol=1e-12)
    # full rank: the carriers carry all of G
    L, R = carriers(torch.randn(7, 5), 5, generator=torch.Generator().manual_seed(0))
    full = reconstruct(G @ R.T, L.T @ G, L, R)
    torch.testing.assert_close(full, G, rtol=0, atol=1e-12)


# -- the reparametrized layer -----------------------------------------------------------------
LAYERS = {
    "linear": (lambda: nn.Linear(10, 7), (5, 10)),
    "conv_stride_pad": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 9)),
    "conv_groups_dilation": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (2, 4, 7, 7)
    ),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 6, 6)),
}  # fmt: skip


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_equals_explicit_reparametrization(kind, float64):
    """Output, and gradients of carriers, bias and input, equal those of W̃·x + L·R·x with
    W̃ = W − L·R constant; W̃ + L·R == W; the forward is bit-identical to the plain layer."""
    make, shape = LAYERS[kind]
    layer = make()
    plain = copy.deepcopy(layer)
    method = attach(nn.Sequential(layer), rank=2, reparametrize_classifier=True)
    path = method.reparametrized[0].path
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, plain(x))

    L = path.left.weight.detach().clone().requires_grad_()
    R = path.right.weight.detach().clone().requires_grad_()
    groups = path.groups
    low_rank = (path.as_left(L) @ path.as_right(R)).reshape(layer.weight.shape)
    w_tilde = (layer.weight - low_rank).detach()
    torch.testing.assert_close(w_tilde + low_rank.detach(), layer.weight, rtol=0, atol=1e-12)
    x2 = x.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    if isinstance(layer, nn.Linear):
        explicit = F.linear(x2, w_tilde + low_rank, bias)
    else:
        conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        explicit = F.conv2d(x2, w_tilde + low_rank, bias, groups=groups, **conv)
    torch.testing.assert_close(out, explicit, rtol=0, atol=1e-12)

    upstream = torch.randn_like(out)
    out.backward(upstream)
    explicit.backward(upstream)
    torch.testing.assert_close(path.left.weight.grad, L.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(path.right.weight.grad, R.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    if bias is not None:
        torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=0, atol=1e-12)
    assert layer.weight.grad is None  # W is not in the per-sample pass


def test_only_carriers_and_nonreparametrized_parameters_are_clipped(float64):
    model = small_net()
    method = attach(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    carrier_names = {n for r in method.reparametrized for n in (r.left_name, r.right_name)}
    assert trainable == carrier_names | {"0.bias", "2.bias", "5.bias", "7.weight", "7.bias"}
    assert [r.weight_name for r in method.reparametrized] == ["0.weight", "2.weight", "5.weight"]
    updated = method.optimizer_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in updated} == {
        "0.weight", "2.weight", "5.weight", "0.bias", "2.bias", "5.bias", "7.weight", "7.bias"
    }  # fmt: skip
    left_only = attach(small_net(), carriers="left")
    assert not any(r.path.right.weight.requires_grad for r in left_only.reparametrized)


def brute_force_rgp_clipped_sum(plain, method, x, y, C, weights=None):
    """Per-sample full gradients one sample at a time, projected onto the carriers, then
    joint clipping over carriers + non-reparametrized parameters."""
    full = reference.per_sample_gradients(plain, x, y)
    per_sample = {}
    for r in method.reparametrized:
        L, R = r.path.matrices()
        G = full.pop(r.weight_name).reshape(len(y), *r.weight_matrix().shape)
        per_sample[r.left_name] = (G @ R.mT).reshape(len(y), *r.path.left.weight.shape)
        if r.path.right.weight.requires_grad:
            per_sample[r.right_name] = (L.mT @ G).reshape(len(y), *r.path.right.weight.shape)
    per_sample.update(full)
    if weights:
        per_sample = {n: g * weights[n] if n in weights else g for n, g in per_sample.items()}
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factors = torch.where(norms > C, C / norms, torch.ones_like(norms))
    sums = {n: torch.einsum("b,b...->...", factors, g) for n, g in per_sample.items()}
    return sums, norms, per_sample


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("carrier_mode", ["both", "left"])
def test_engine_clips_projected_per_sample_gradients_jointly(mode, carrier_mode, float64):
    model = small_net()
    plain = copy.deepcopy(model)
    method = attach(model, carriers=carrier_mode)
    x, y = batch()
    _, unclipped_norms, _ = brute_force_rgp_clipped_sum(plain, method, x, y, float("inf"))
    C = float(unclipped_norms.median())  # some samples are clipped, some are not
    expected, expected_norms, per_sample = brute_force_rgp_clipped_sum(plain, method, x, y, C)
    # the brute-force reference on the reparametrized model agrees: ∂L_i = G_i·Rᵀ, ∂R_i = Lᵀ·G_i
    direct = reference.per_sample_gradients(model, x, y)
    assert direct.keys() == per_sample.keys()
    for n, g in direct.items():
        torch.testing.assert_close(g, per_sample[n], rtol=1e-10, atol=1e-12)
    grads, norms = clip_and_sum(model, x, y, C, mode)
    assert grads.keys() == expected.keys()
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-10, atol=1e-12)
    assert (expected_norms > C).any() and (expected_norms < C).any()


def test_nonreparam_grad_scale_scales_before_clipping(float64):
    model = small_net()
    plain = copy.deepcopy(model)
    method = attach(model, nonreparam_grad_scale=0.01)
    weights = method.coordinate_weights(0)
    carrier_names = {n for r in method.reparametrized for n in (r.left_name, r.right_name)}
    assert set(weights) == {n for n, p in model.named_parameters() if p.requires_grad} - (
        carrier_names
    )
    assert all(torch.all(w == 0.01) for w in weights.values())
    x, y = batch()
    expected, norms, _ = brute_force_rgp_clipped_sum(plain, method, x, y, 0.3, weights)
    grads, got_norms = clip_and_sum(model, x, y, 0.3, "per_sample", weights)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-10, atol=1e-12)
    assert attach(small_net()).coordinate_weights(0) is None  # scale 1: no weights


# -- the DP step ------------------------------------------------------------------------------
def dp_step(model, method, engine, sigma, seed=3):
    return GradientStep(
        model,
        [method],
        engine=engine,
        noise_multiplier=sigma,
        max_grad_norm=0.3,
        expected_batch_size=6.0,
        sample_rate=0.1,
        ledger=accounting.Ledger(1e-5),
        noise_generator=torch.Generator().manual_seed(seed),
    )


def test_noise_only_on_carriers_and_nonreparametrized_coordinates(float64):
    model = small_net()
    method = attach(model)
    x, y = batch()
    with make_engine("per_sample", model).attached_to_model() as engine:
        noisy, _ = dp_step(model, method, engine, sigma=2.0).private_gradient(x, y, None)
        clean, _ = dp_step(model, method, engine, sigma=0.0).private_gradient(x, y, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert noisy.keys() == trainable  # no full weight W is noised directly
    for n in trainable:
        assert (noisy[n] != clean[n]).all()  # every carrier / non-reparam coordinate is noised
    # the full weights' updates stay in the carriers' subspaces, noise included
    update = method.transform_update(noisy)
    assert not any(n in update for r in method.reparametrized for n in (r.left_name, r.right_name))
    for r in method.reparametrized:
        L, R = r.path.matrices()
        dW = update[r.weight_name].reshape(r.weight_matrix().shape)
        eye_p, eye_d = torch.eye(L.shape[-2]), torch.eye(R.shape[-1])
        outside = (eye_p - L @ L.mT) @ dW @ (eye_d - R.mT @ R)
        assert outside.abs().max() < 1e-12 * dW.abs().max()
        assert dW.abs().max() > 0


def test_step_updates_full_weights_and_forward_stays_plain(float64):
    model = small_net()
    method = attach(model)
    optimizer = torch.optim.SGD(method.optimizer_parameters(model), lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch()
    carriers_before = {r.weight_name: r.path.matrices() for r in method.reparametrized}
    with make_engine("per_sample", model).attached_to_model() as engine:
        # the expected update: the same noisy carrier sums (same noise seed), reconstructed
        twin = dp_step(model, method, engine, sigma=1.0)
        expected = method.transform_update(twin.private_gradient(x, y, None)[0])
        dp_step(model, method, engine, sigma=1.0)((x, y), optimizer)
    for n, g in expected.items():
        torch.testing.assert_close(model.get_parameter(n), before[n] - 0.5 * g, rtol=0, atol=1e-12)
    for r in method.reparametrized:  # carriers are rebuilt, never stepped by the optimizer
        L, R = r.path.matrices()
        assert torch.equal(L, carriers_before[r.weight_name][0])
        assert torch.equal(R, carriers_before[r.weight_name][1])
    # evaluation sees W: the reparametrized model computes exactly the plain model's function
    plain = small_net()
    plain.load_state_dict({n: p for n, p in model.state_dict().items() if ".rgp." not in n})
    x_new = torch.randn(4, 4, 8, 8)
    assert torch.equal(model(x_new), plain(x_new))
    model.eval()
    assert torch.equal(model(x_new), plain(x_new))


def test_restore_plain_layers_leaves_the_plain_model(float64):
    model = small_net()
    names = [n for n, _ in model.named_parameters()]
    method = attach(model)
    method.restore_plain_layers()
    assert [n for n, _ in model.named_parameters()] == names
    assert all(p.requires_grad for p in model.parameters())
    x, _ = batch()
    model(x).sum().backward()  # no hook left behind
    assert all(p.grad is not None for p in model.parameters())


# -- carrier sources, history, checkpoints ----------------------------------------------------
def rank_one_update(model: nn.Module, name: str) -> None:
    weight = model.get_parameter(name)
    u, v = torch.randn(weight.shape[0]), torch.randn(weight[0].numel())
    with torch.no_grad():
        weight += torch.outer(u, v).reshape(weight.shape)


@pytest.mark.parametrize("source", CARRIER_SOURCES)
def test_carriers_span_the_top_direction_of_their_target(source, float64):
    """Warm-up: W_t; then historical W_t − W_{t−k}, from_init W_t/‖W_t‖ − W_0/‖W_0‖, weight W_t.
    (Many power iterations, so the rank-one carriers converge to the top singular pair.)"""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(9, 8))
    method = attach(
        model,
        rank=1,
        power_iterations=300,
        carrier_source=source,
        warmup_steps=2,
        history_steps=2,
        reparametrize_classifier=True,
    )
    layer = method.reparametrized[0]
    seen = []
    for step in range(6):
        W = layer.weight_matrix()[0].clone()
        seen.append(W)
        method.refresh_carriers()
        if step < 2 or source == "weight":
            target = W
        elif source == "historical":
            target = W - seen[step - 2]
        else:
            target = W / W.norm() - seen[0] / seen[0].norm()
        U, _, Vh = torch.linalg.svd(target)
        L, R = layer.path.matrices()
        assert abs(L[0, :, 0] @ U[:, 0]) == pytest.approx(1.0, abs=1e-8)
        assert abs(R[0, 0] @ Vh[0]) == pytest.approx(1.0, abs=1e-8)
        method.after_optimizer_step(None)
        rank_one_update(model, "0.weight")


def test_state_dict_round_trip_continues_identically(float64):
    torch.manual_seed(4)
    model = small_net()
    twin = copy.deepcopy(model)
    method = attach(model, history_steps=3)
    for _ in range(3):
        method.refresh_carriers()
        method.after_optimizer_step(None)
        rank_one_update(model, "5.weight")
    state = copy.deepcopy(method.state_dict())
    twin.load_state_dict({n: p for n, p in model.state_dict().items() if ".rgp." not in n})
    resumed = attach(twin, history_steps=3)
    resumed.load_state_dict(state)
    method.refresh_carriers()
    resumed.refresh_carriers()
    for a, b in zip(method.reparametrized, resumed.reparametrized, strict=True):
        assert torch.equal(a.path.left.weight, b.path.left.weight)
        assert torch.equal(a.path.right.weight, b.path.right.weight)


# -- configuration and end-to-end ---------------------------------------------------------------
# σ fixed and the RDP accountant: calibrating σ with PRV costs far more than these tiny runs.
FIXED_SIGMA = ["privacy.noise_multiplier=1.0", "privacy.epsilon=null", "privacy.accountant=rdp"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("rgp.rank=0", "rgp.rank"),
        ("rgp.carriers=right", "rgp.carriers"),
        ("rgp.carrier_source=gradient", "rgp.carrier_source"),
        ("rgp.layers=[attention]", "rgp.layers"),
        ("rgp.nonreparam_grad_scale=0", "rgp.nonreparam_grad_scale"),
        ("rgp.power_iterations=0", "rgp.power_iterations"),
    ],
)
def test_bad_options_fail_with_one_line(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        validate(tiny_cfg("method=rgp", override))


@pytest.mark.parametrize("mode", MODES)
def test_cnn_tanh_trains_through_the_config(tiny_cfg, tmp_path, mode):
    cfg = tiny_cfg(*FIXED_SIGMA, "method=rgp", f"clipping.mode={mode}", "rgp.rank=4")
    result = run(cfg, tmp_path / "run")
    assert result["method"] == "rgp" and result["steps"] == 4
    assert result["rgp_reparametrized_layers"] == 3  # two convs and the hidden Linear
    assert result["rgp_clipped_params"] < result["n_params"] / 2
    assert result["test_loss"] == result["test_loss"]  # finite, not NaN
    # ε is DP-SGD's for (σ, q, steps): one (σ, q) mechanism per step, nothing else
    q, steps = result["sample_rate"], result["steps"]
    assert [list(h) for h in result["accountant_history"]] == [[1.0, q, steps]]
    again = accounting.epsilon(1.0, q, steps, 1e-3, "rdp")
    assert result["epsilon"] == pytest.approx(again, rel=1e-12)
    assert result["n_params"] == 10650  # the plain cnn_tanh: carriers are gone after fit


def test_resnet_gn_trains(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        *FIXED_SIGMA, "method=rgp", "model=resnet_gn", "dataset.size=32", "dataset.batch_size=16",
        "trainer.max_steps=2", "model.groups=4",
    )  # fmt: skip
    result = run(cfg, tmp_path / "run")
    assert result["steps"] == 2 and result["rgp_reparametrized_layers"] == 20  # all convs
    assert result["test_loss"] == result["test_loss"]


def test_resume_from_checkpoint_continues_exactly(tiny_cfg, tmp_path):
    # clipping=bk: auto picks each layer's path by timing, which may differ between the two
    # runs and change the last float bits
    fixed = [*FIXED_SIGMA, "method=rgp", "rgp.history_steps=3", "rgp.warmup_steps=2",
             "clipping=bk"]  # fmt: skip
    straight = run(
        tiny_cfg(*fixed, "trainer.max_epochs=2", output_dir=tmp_path / "a"), tmp_path / "a"
    )
    run(tiny_cfg(*fixed, "trainer.max_epochs=1", output_dir=tmp_path / "b"), tmp_path / "b")
    (tmp_path / "b" / "result.json").unlink()
    cfg = tiny_cfg(*fixed, "trainer.max_epochs=2", "resume=true", output_dir=tmp_path / "b")
    resumed = run(cfg, tmp_path / "b")
    assert resumed["steps"] == straight["steps"] == 8
    assert resumed["test_loss"] == straight["test_loss"]
