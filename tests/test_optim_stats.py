"""Statistics sources against brute force (one autograd call per example / microbatch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tangentscope import ConfigError, ShapeError, UnsupportedModelError
from tangentscope.optim import (
    GatedAdamW,
    MicrobatchStats,
    PerExampleStats,
    VmapStats,
    noise_variance,
)
from test_optim_helpers import brute_per_example, brute_sums, one_thread  # noqa: F401
from zoo import MODELS, ZOO, SeqModel, inputs_for, kind

pytestmark = pytest.mark.usefixtures("one_thread")


def mse(out, y):
    return ((out - y) ** 2).sum(-1).mean()


def ce(out, y):
    return F.cross_entropy(out, y)


def _hooked(model, loss_fn, x, y, **kw):
    stats = PerExampleStats(model, **kw)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    got = stats.collect()
    stats.remove()
    return got


def _assert_sums(model, got, ref, count, rtol=1e-10):
    for n, p in model.named_parameters():
        s1, s2 = ref[n]
        m = got[id(p)]
        assert m.count == count, n
        scale = s2.abs().max().clamp(min=1e-300)
        torch.testing.assert_close(m.grad_sq_sum, s2, rtol=rtol, atol=rtol * float(scale),
                                   msg=lambda s, n=n: f"{n} S2: {s}")
        torch.testing.assert_close(m.grad_sum, s1, rtol=rtol, atol=rtol * float(
            s1.abs().max().clamp(min=1e-300)), msg=lambda s, n=n: f"{n} S1: {s}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("source", ["hooks", "vmap"])
def test_sources_match_brute_force_on_the_zoo(name, source):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = inputs_for(kind(name), 7)
    with torch.no_grad():
        p = model(x).shape[1]
    y = torch.randn(7, p, dtype=torch.float64)
    ref = brute_sums(model, mse, x, y)
    if source == "hooks":
        got = _hooked(model, mse, x, y)
    else:
        vs = VmapStats(model, mse, chunk_size=3)
        model.zero_grad()
        loss = vs.backward(x, y)
        torch.testing.assert_close(loss, mse(model(x), y))
        got = vs.collect()
        for n, q in model.named_parameters():               # p.grad = the mean-loss gradient
            torch.testing.assert_close(q.grad, ref[n][0])
    _assert_sums(model, got, ref, 7)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
@pytest.mark.parametrize("setting", ZOO, ids=lambda s: s.name)
def test_per_example_stats_on_every_zoo_setting(setting):
    """The settings the kernel tests use (grouped convolutions with every padding mode,
    GroupNorm, eval BatchNorm, embeddings with padding, reused and tied layers), against the
    brute-force sums and VmapStats."""
    torch.manual_seed(0)
    model = setting.build()
    x = setting.inputs(7, 0)
    with torch.no_grad():
        p = model(x).shape[1]
    y = torch.randn(7, p, dtype=torch.float64)
    ref = brute_sums(model, mse, x, y)
    _assert_sums(model, _hooked(model, mse, x, y, broadcast=setting.broadcast), ref, 7)
    vs = VmapStats(model, mse, chunk_size=4)
    model.zero_grad()
    vs.backward(x, y)
    _assert_sums(model, vs.collect(), ref, 7)


@pytest.mark.parametrize("T", [1, 3, 9])                 # L = 1 / 2 (pair expansion) / 5 (bmm)
def test_sequence_layers_every_closed_form_path(T):
    torch.manual_seed(T)
    model = SeqModel().double()
    x = torch.randn(6, 3, T, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    _assert_sums(model, _hooked(model, mse, x, y), brute_sums(model, mse, x, y), 6)
    _assert_sums(model, _hooked(model, mse, x, y, pair_limit=0, chunk_bytes=64),
                 brute_sums(model, mse, x, y), 6)


class TokenModel(nn.Module):
    """Embedding with padding and repeated tokens, a Conv2d, eval BatchNorm2d, a tied head and a
    module applied twice per forward."""

    def __init__(self, V=6, d=4):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.conv = nn.Conv2d(1, 2, (2, 2), padding="valid")
        self.bn = nn.BatchNorm2d(2).eval()
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight                # tied

    def forward(self, tok):                               # tok: (b, L)
        h = self.emb(tok)                                 # (b, L, d)
        c = self.bn(self.conv(h.unsqueeze(1)))            # (b, 2, L-1, d-1)
        h = h + 0.1 * c.mean((1, 2)).sum(-1)[:, None, None]
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))  # mix used twice
        return self.head(h.mean(1))


def test_tokens_padding_tied_and_reused_weights():
    torch.manual_seed(0)
    model = TokenModel().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2)
    tok = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 5, 1], [4, 1, 4, 1], [2, 5, 0, 3]])
    y = torch.tensor([1, 2, 3, 4, 5])
    _assert_sums(model, _hooked(model, ce, tok, y), brute_sums(model, ce, tok, y), 5)


@pytest.mark.parametrize("b", [3, 4])                     # b = 4 = L: ambiguous → explicit
def test_position_embedding_without_batch_dim(b):
    from tangentscope.models import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer(7, 3, d_model=8, n_heads=2, n_layers=1, d_mlp=16, max_len=4).double()
    x = torch.randint(0, 7, (b, 4))
    y = torch.randn(b, 3, dtype=torch.float64)
    kw = {"broadcast": ["pos"]} if b == 4 else {}
    _assert_sums(model, _hooked(model, mse, x, y, **kw), brute_sums(model, mse, x, y), b)


def test_copies_of_a_hooked_model_and_autograd_grad_calls_are_ignored():
    import copy

    torch.manual_seed(0)
    model = MODELS["mlp_p4"]()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    stats = PerExampleStats(model)
    twin = copy.deepcopy(model)                            # carries the hooks along
    mse(twin(torch.randn(50, 3, dtype=torch.float64)), torch.zeros(50, 4,
                                                                  dtype=torch.float64)).backward()
    torch.autograd.grad(mse(model(x[:2]), y[:2]), list(model.parameters()))   # a penalty term
    model.zero_grad()
    mse(model(x), y).backward()
    _assert_sums(model, stats.collect(), brute_sums(model, mse, x, y), 6)


def test_gradient_accumulation_adds_examples():
    torch.manual_seed(0)
    model = MODELS["mlp_p4"]()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    stats = PerExampleStats(model)
    model.zero_grad()
    for sl in (slice(0, 5), slice(5, 10)):               # HF style: mean over microbatch / M
        (mse(model(x[sl]), y[sl]) / 2).backward()
    with torch.no_grad():
        model(x)                                          # forward without grad: ignored
    _assert_sums(model, stats.collect(), brute_sums(model, mse, x, y), 10)


def test_low_precision_and_float64_parameters():
    torch.manual_seed(0)
    ref_model = MODELS["mlp_p4"]()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    model = MODELS["mlp_p4"]().to(torch.bfloat16)
    model.load_state_dict(ref_model.to(torch.bfloat16).double().state_dict())
    ref = brute_sums(model.double(), mse, x, y)           # exact on the bf16-rounded weights
    model = model.to(torch.bfloat16)
    got = _hooked(model, mse, x.bfloat16(), y.bfloat16())
    for n, p in model.named_parameters():
        m = got[id(p)]
        assert m.grad_sq_sum.dtype == torch.float32       # accumulated in float32
        rel = (m.grad_sq_sum.double() - ref[n][1]).norm() / ref[n][1].norm()
        assert rel < 0.05, (n, float(rel))                # bf16 forward/backward rounding


def test_mean_and_sum_losses_give_the_same_noise_in_their_own_units():
    torch.manual_seed(0)
    model = MODELS["mlp_p1"]()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    mean = _hooked(model, mse, x, y)
    total = _hooked(model, lambda o, t: ((o - t) ** 2).sum(), x, y)
    for p in model.parameters():
        a, b = mean[id(p)], total[id(p)]
        torch.testing.assert_close(b.noise_variance(), 64 * a.noise_variance())  # b² × in p.grad²
        torch.testing.assert_close(b.loo_decrease() / b.grad_sum.square().clamp(min=1e-300),
                                   a.loo_decrease() / a.grad_sum.square().clamp(min=1e-300))


def test_microbatch_source_matches_brute_force_and_needs_two():
    torch.manual_seed(0)
    model = MODELS["cnn"]()
    x = inputs_for("cnn", 12)
    y = torch.randn(12, 3, dtype=torch.float64)
    stats = MicrobatchStats(model)
    M = 4
    model.zero_grad()
    for j in range(M):
        sl = slice(3 * j, 3 * j + 3)
        (mse(model(x[sl]), y[sl]) / M).backward()
    got = stats.collect()
    for p in model.parameters():
        cs = []
        for j in range(M):
            sl = slice(3 * j, 3 * j + 3)
            g = torch.autograd.grad(mse(model(x[sl]), y[sl]) / M, p)[0]
            cs.append(g)
        cs = torch.stack(cs)
        m = got[id(p)]
        assert m.count == M and m.source == "microbatch"
        torch.testing.assert_close(m.grad_sum, cs.sum(0))
        torch.testing.assert_close(m.grad_sq_sum, (cs * cs).sum(0))
        torch.testing.assert_close(m.noise_variance(),
                                   noise_variance(cs.sum(0), (cs * cs).sum(0), M))
    stats.reset()
    opt = GatedAdamW(model.parameters(), stats=stats)
    model.zero_grad()
    mse(model(x), y).backward()                           # one microbatch only
    with pytest.raises(ConfigError, match="variance of one sample is undefined"):
        opt.step()


def test_errors_name_the_problem_and_the_fix():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(UnsupportedModelError, match=r"scale.*VmapStats"):
        PerExampleStats(Raw())
    with pytest.raises(UnsupportedModelError, match=r"0\.weight.*register_rule.*VmapStats"):
        PerExampleStats(nn.Sequential(nn.Conv3d(2, 2, 3)))   # grouped Conv2d works now
    with pytest.raises(UnsupportedModelError, match="sparse"):
        PerExampleStats(nn.Embedding(5, 3, sparse=True))
    with pytest.raises(ConfigError, match="not modules"):
        PerExampleStats(nn.Linear(2, 2), broadcast=["nope"])

    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))   # train mode
    PerExampleStats(bn)
    with pytest.raises(UnsupportedModelError, match="model.eval"):
        bn(torch.randn(5, 3))

    class TiedFunctional(nn.Module):                      # head via F.linear: invisible to hooks
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.fc = nn.Linear(3, 3)

        def forward(self, t):
            return F.linear(torch.tanh(self.fc(self.emb(t))), self.emb.weight)

    m = TiedFunctional()
    PerExampleStats(m)
    with pytest.raises(UnsupportedModelError, match="do not add up to p.grad"):
        ce(m(torch.tensor([1, 2, 3])), torch.tensor([0, 1, 2])).backward()

    flat = nn.Sequential(nn.Flatten(0, 1), nn.Linear(3, 2))
    PerExampleStats(flat)
    with pytest.raises(ShapeError, match="batch as the first"):
        flat(torch.randn(4, 5, 3))

    with pytest.raises(ShapeError, match="examples but targets"):
        VmapStats(nn.Linear(3, 1), mse).backward(torch.randn(4, 3), torch.randn(3, 1))


def _ddp_worker(rank, world, init_file, out_file, bucket_view):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = MODELS["mlp_p4"]()
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    stats = MicrobatchStats(model)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(world, 2, 5, 3, generator=g, dtype=torch.float64)   # rank, microbatch, b
    Y = torch.randn(world, 2, 5, 4, generator=g, dtype=torch.float64)
    with ddp.no_sync():                                                 # accumulate locally
        (mse(ddp(X[rank, 0]), Y[rank, 0]) / 2).backward()
    (mse(ddp(X[rank, 1]), Y[rank, 1]) / 2).backward()                  # all-reduce
    got = stats.collect()
    if rank == 0:
        out = []
        for p in model.parameters():
            cs = torch.stack([torch.autograd.grad(mse(model(X[r, j]), Y[r, j]) / 2, p)[0] / world
                              for r in range(world) for j in range(2)])  # DDP averages ranks
            m = got[id(p)]
            out.append((m.count, m.grad_sum, m.grad_sq_sum, p.grad.clone(), cs))
        torch.save(out, out_file)
    dist.barrier()          # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("bucket_view", [False, True])
def test_microbatch_source_under_ddp_ranks_are_microbatches(tmp_path, bucket_view):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), bucket_view),
             nprocs=2)
    for count, s1, s2, grad, cs in torch.load(tmp_path / "out"):
        assert count == 4
        torch.testing.assert_close(s1, cs.sum(0))
        torch.testing.assert_close(grad, cs.sum(0))
        torch.testing.assert_close(s2, (cs * cs).sum(0))


# -- issue 12: DDP, GradScaler, autocast, validation -----------------------------------------
def _sources_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from tangentscope.optim import GatedAdamW

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, world, 5, 3, generator=g, dtype=torch.float64)   # step, rank, b
    Y = torch.randn(3, world, 5, 4, generator=g, dtype=torch.float64)
    out = {}
    for source in ("per-example", "vmap", "microbatch", "streaming"):
        torch.manual_seed(0)
        model = MODELS["mlp_p4"]()
        ddp = nn.parallel.DistributedDataParallel(model)
        if source == "per-example":
            stats = PerExampleStats(model)
        elif source == "vmap":
            stats = VmapStats(model, mse)
        elif source == "microbatch":
            stats = MicrobatchStats(model)
        else:
            stats = "streaming"
        opt = GatedAdamW(model.parameters(), lr=1e-2, stats=stats, gate=source != "microbatch")
        first = None
        for step in range(3):
            opt.zero_grad()
            if source == "vmap":
                stats.backward(X[step, rank], Y[step, rank])
            else:
                mse(ddp(X[step, rank]), Y[step, rank]).backward()
            if step == 0 and source != "streaming":
                first = {n: (m.grad_sum, m.grad_sq_sum, m.count) for n, p in
                         model.named_parameters() if (m := stats.collect().get(id(p)))}
            opt.step()
        out[source] = ({n: p.detach().clone() for n, p in model.named_parameters()}, first)
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()          # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def test_every_source_under_ddp_reduces_across_ranks(tmp_path):
    """Two gloo ranks: every statistics source gates on the global statistics (the brute-force
    sums over both ranks' examples, contributions ∇ℓ/(b R)) and the replicas stay equal."""
    import torch.multiprocessing as mp

    mp.spawn(_sources_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 2, 5, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = MODELS["mlp_p4"]()
    ref = brute_sums(model, mse, X[0].reshape(10, 3), Y[0].reshape(10, 4))   # mean over 10
    for source in ("per-example", "vmap", "microbatch", "streaming"):
        (w0, first0), (w1, _) = r0[source], r1[source]
        for n in w0:                                                  # identical replicas
            torch.testing.assert_close(w0[n], w1[n], rtol=0, atol=0, msg=f"{source} {n}")
        if source in ("per-example", "vmap"):
            for n, (s1, s2, count) in first0.items():
                assert count == 10
                torch.testing.assert_close(s1, ref[n][0], msg=f"{source} {n} S1")
                torch.testing.assert_close(s2, ref[n][1], msg=f"{source} {n} S2")
        elif source == "microbatch":
            for n, (s1, _, count) in first0.items():
                assert count == 2
                torch.testing.assert_close(s1, ref[n][0], msg=f"{source} {n} S1")


@pytest.mark.parametrize("source", ["per-example", "microbatch", "vmap"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradscaler_skipped_steps_do_not_leak_into_the_next_step(source, set_to_none):
    from tangentscope.optim import GatedAdamW

    torch.manual_seed(0)
    model = MODELS["mlp_p4"]().float()
    x, y = torch.randn(12, 3), torch.randn(12, 4)
    stats = {"per-example": lambda: PerExampleStats(model), "vmap": lambda: VmapStats(
        model, lambda o, t: mse(o, t) * torch.inf), "microbatch": lambda: MicrobatchStats(
        model)}[source]()
    opt = GatedAdamW(model.parameters(), lr=1e-3, stats=stats)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for k in range(3):                                     # overflowing steps, all skipped
        opt.zero_grad(set_to_none=set_to_none)
        xs, ys = x[4 * k:4 * k + 4], y[4 * k:4 * k + 4]
        if source == "vmap":                               # no scaler: the step is skipped
            stats.backward(xs, ys)
            continue
        scaler.scale(mse(model(xs), ys) * torch.inf).backward()
        scaler.step(opt)
        scaler.update()
    assert source == "vmap" or scaler.get_scale() == 2.0 ** 5   # three skips, three back-offs
    opt.zero_grad(set_to_none=set_to_none)
    xs, ys = x[:6], y[:6]
    if source == "vmap":
        stats.loss_fn = mse
        stats.backward(xs, ys)
        S = 1.0
    else:
        scaler.scale(mse(model(xs), ys)).backward()
        S = scaler.get_scale()
    got = stats.collect()
    ref = brute_sums(model, mse, xs, ys)
    for n, p in model.named_parameters():
        m = got[id(p)]
        assert m.count == (1 if source == "microbatch" else 6), (n, m.count)
        torch.testing.assert_close(m.grad_sum, S * ref[n][0], rtol=1e-4, atol=1e-6 * S)
        if source != "microbatch":
            torch.testing.assert_close(m.grad_sq_sum, S * S * ref[n][1], rtol=1e-4,
                                       atol=1e-9 * S * S)


@pytest.mark.parametrize("source", ["per-example", "microbatch", "vmap"])
def test_every_source_under_bf16_autocast(source):
    torch.manual_seed(0)
    model = MODELS["mlp_p4"]().float()
    x, y = torch.randn(8, 3), torch.randn(8, 4)
    ref = brute_sums(model, mse, x, y)
    stats = {"per-example": lambda: PerExampleStats(model), "vmap": lambda: VmapStats(
        model, mse), "microbatch": lambda: MicrobatchStats(model)}[source]()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if source == "vmap":
            stats.backward(x, y)
        elif source == "microbatch":
            for sl in (slice(0, 4), slice(4, 8)):
                (mse(model(x[sl]), y[sl]) / 2).backward()
        else:
            mse(model(x), y).backward()                     # validation passes in bf16
    got = stats.collect()
    for n, p in model.named_parameters():
        m = got[id(p)]
        torch.testing.assert_close(m.grad_sum, ref[n][0], rtol=0.1, atol=0.05 * float(
            ref[n][0].abs().max()))
        if source != "microbatch":
            rel = (m.grad_sq_sum - ref[n][1]).norm() / ref[n][1].norm()
            assert rel < 0.1, (n, float(rel))


class KeyBias(nn.Module):
    """Attention whose key bias gets an analytically zero gradient (softmax shift invariance),
    as in BERT: numerically it is rounding noise."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4),
                                            nn.Linear(4, 2))

    def forward(self, x):                                  # (b, L, 4)
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 2, -1)
        return self.out((att @ self.v(x)).mean(1))


def test_validation_accepts_vanishing_gradients_and_names_the_right_cause():
    torch.manual_seed(0)
    model = KeyBias()
    x, y = torch.randn(6, 5, 4), torch.randn(6, 2)
    stats = PerExampleStats(model)
    mse(model(x), y).backward()                            # the key bias' gradient is ~1e-9
    assert float(model.k.bias.grad.abs().max()) < 1e-5
    got = stats.collect()
    assert float(got[id(model.k.bias)].grad_sq_sum.abs().max()) < 1e-10
    model.zero_grad()
    stats.reset()
    stats._validate_left = 1

    def perturb(g):                                        # a hook rescales the gradient by 1%
        return g * 1.01

    h = model.out.weight.register_hook(perturb)
    with pytest.raises(UnsupportedModelError, match="rounding tolerance") as e:
        mse(model(x), y).backward()
    assert "tied head" not in str(e.value)
    h.remove()


def test_registered_rule_serves_the_statistics():
    from tangentscope.derivatives import LayerRule, register_rule

    class Scale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

        def forward(self, x):
            return x * self.weight

    class ScaleRule(LayerRule):
        roles = ("weight",)

        def module_call(self, module, x):
            return {"input": x, "weight": module.weight}

        def data(self, bound):
            return {"x": bound["input"].detach()}

        def per_example(self, data, delta, roles):
            B, P, d = delta.shape[0], delta.shape[1], delta.shape[-1]
            return (delta * data["x"].unsqueeze(1)).reshape(B, P, -1, d).sum(2)

    with pytest.raises(UnsupportedModelError, match="register_rule"):
        PerExampleStats(nn.Sequential(nn.Linear(3, 4), Scale(4)))
    register_rule(Scale, ScaleRule())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    _assert_sums(model, _hooked(model, mse, x, y), brute_sums(model, mse, x, y), 5)
