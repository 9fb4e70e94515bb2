"""``train.py --plan`` (:mod:`orchestrate.memory_plan`) and the per-step ``mfu`` / peak memory
(:mod:`orchestrate.step_efficiency`): the ZeRO arithmetic, the linear micro-batch extrapolation, FLOPs of
modules against their analytic counts on fake tensors, a traced step of the debug model, the table and JSON,
and the one-line errors. The full flavor's figures and the CPU check against a real step are in
``test_memory_plan_check.py`` (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from orchestrate import memory_plan as mp
from orchestrate import step_efficiency as se
from orchestrate import train
from orchestrate.run_errors import StageConfigError
from orchestrate.stages import TrackingConfig
from pipelines.errors import run_cli
from xsam_model.flavors import DEBUG
from xsam_model.modeling.connector import SegConnector

GiB = 1024**3


# ---------------------------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize(
    "zero,params,grads,optim",
    [
        (0, 2 * 10, 2 * 6, 12 * 6),  # bf16 weights (all), bf16 grads + fp32 master/m/v (trainable)
        (1, 2 * 10, 2 * 6, 12 * 6 / 4),
        (2, 2 * 10, 2 * 6 / 4, 12 * 6 / 4),
        (3, 2 * 10 / 4, 2 * 6 / 4, 12 * 6 / 4),
    ],
)
def test_model_states_follow_zero_partitioning(zero, params, grads, optim):
    s = mp.model_states(10, 6, zero_stage=zero, world=4)
    assert s == {"parameters": params, "gradients": grads, "optimizer": optim}


def test_model_states_fp32_has_no_master_copy():
    assert mp.model_states(10, 6, zero_stage=0, world=1, precision="fp32") == {
        "parameters": 40,
        "gradients": 24,
        "optimizer": 48,
    }


def test_zero_buffers_are_the_generated_configs_buckets():
    # deepspeed_config on GPUs: reduce_bucket_size 1e9 elements, overlap_comm → two buffers
    assert mp.zero_buffers(2) == 1e9 * 2 * 2  # bf16 staging
    assert mp.zero_buffers(1) == 1e9 * 4 * 2  # ZeRO-1 stages the fp32 accumulator
    assert mp.zero_buffers(0) == mp.zero_buffers(3) == 0


def test_activations_extrapolate_linearly_and_the_largest_batch_fits():
    assert mp.activation_at(10, 14, 1) == 10 and mp.activation_at(10, 14, 5) == 26
    fixed, b1, b2 = 100, 10, 14
    n = mp.largest_micro_batch(fixed, b1, b2, 150)
    assert fixed + mp.activation_at(b1, b2, n) <= 150 < fixed + mp.activation_at(b1, b2, n + 1)
    assert mp.largest_micro_batch(fixed, b1, b2, 109) == 0  # micro batch 1 does not fit


def test_stage_shape_is_the_longest_sample():
    shape = mp.stage_shape(mp.XSamConfig(), 3)
    # 729 SigLIP + 1024 SAM tokens replace the one <image> of 2319 text tokens
    assert (shape.sam_size, shape.siglip_size, shape.seq_len) == (1024, 384, 729 + 1024 + 2319 - 1)
    assert mp.stage_shape(mp.XSamConfig(), 1).seq_len == 0
    assert mp.stage_shape(mp.XSamConfig(), 2, seq_len=2000).seq_len == 2000
    with pytest.raises(mp.OrchestrateError, match="image tokens"):
        mp.stage_shape(mp.XSamConfig(), 2, seq_len=100)


# ---------------------------------------------------------------------------------------------- FLOPs
def _fake_flops(make, *shapes) -> tuple[int, int]:
    """Forward and backward FLOPs of the function ``make()`` returns, on fake bf16 inputs of ``shapes``."""
    with FakeTensorMode():
        fn = make()
        xs = [torch.empty(s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
        with mp.flop_counter() as c:
            out = fn(*xs)
        fwd = c.get_total_flops()
        with mp.flop_counter() as c:
            out.float().sum().backward()
        return fwd, c.get_total_flops()


def test_linear_flops_are_2mnk():
    m, k, n = 64, 96, 80
    fwd, bwd = _fake_flops(lambda: nn.Linear(k, n, bias=False, dtype=torch.bfloat16), (m, k))
    assert fwd == 2 * m * n * k
    assert bwd == 2 * (2 * m * n * k)  # grad input + grad weight


def test_attention_flops_are_4bhs2d():
    b, h, s, d = 2, 4, 128, 32
    fwd, bwd = _fake_flops(lambda: nn.functional.scaled_dot_product_attention, *[(b, h, s, d)] * 3)
    assert fwd == 4 * b * h * s * s * d  # QKᵀ and PV
    assert bwd == 5 * fwd // 2  # flash backward: QKᵀ recomputed, then dV, dP, dQ, dK


def test_fake_model_has_storage_less_params_in_the_run_dtype():
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = mp.fake_model(DEBUG, 2, torch.bfloat16, mode)
    params = list(model.parameters())
    assert all(isinstance(p, FakeTensor) and p.dtype == torch.bfloat16 for p in params)
    # stage 2 trains the two projectors only
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"visual_projector", "seg_projector"}


# ---------------------------------------------------------------------------------------------- traces
@pytest.fixture(scope="module")
def debug_traces():
    shape = mp.stage_shape(DEBUG, 3)
    return {b: mp.trace_step(DEBUG, 3, shape, b) for b in (1, 2)}, shape


def test_trace_counts_params_and_grads_of_the_model(debug_traces):
    traces, _ = debug_traces
    total, trainable = mp._param_counts(DEBUG, 3)
    peak = traces[1].peak
    # bf16: 2 B per element (each tensor rounded up to the allocator's 512 B, per category here)
    assert 2 * total <= peak["Parameter"] < 2 * total + 512
    assert peak["Gradient"] <= 2 * trainable + 512
    assert traces[1].activations > 0 and traces[2].activations > traces[1].activations
    assert traces[1].owners and traces[1].owners[-1].startswith("aten.")


def test_flop_trace_counts_forward_and_backward(debug_traces):
    _, shape = debug_traces
    t = mp.trace_step(DEBUG, 3, shape, 1, flops=True)
    assert t.flops_fwd > 0 and t.flops_fwd < t.flops_bwd <= 3 * t.flops_fwd
    assert t.peak == {}


def test_untraceable_module_is_named(monkeypatch):
    def data_dependent(self, feats):
        return [f * float(f.sum()) for f in feats]  # a value read: fake tensors have none

    monkeypatch.setattr(SegConnector, "forward", data_dependent)
    with pytest.raises(mp.PlanTraceError, match="module seg_connector failed"):
        mp.trace_step(DEBUG, 1, mp.stage_shape(DEBUG, 1), 1)


# ---------------------------------------------------------------------------------------------- the command
def test_plan_command_prints_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["--stage", "3", "--flavor", "debug", "--plan", "--gpu-memory", "0.001", "80"]
    assert run_cli(train.main, [*argv, "--zero-stage", "3", "--plan-json", str(out)]) == 0
    text = capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["layout"]["zero_stage"] == 3 and plan["layout"]["gpus"] == 2  # the debug stage's 2 workers
    assert plan["fits"] == {"0.001": False, "80": True}
    assert "DOES NOT FIT 0.001 GiB (largest consumer: activations)" in text
    assert plan["max_micro_batch"]["0.001"] == {"checkpointed": 0, "none": 0}
    assert plan["max_micro_batch"]["80"]["none"] <= plan["max_micro_batch"]["80"]["checkpointed"]
    g = plan["per_gpu_gib"]
    parts = ("parameters", "gradients", "optimizer", "zero_buffers", "activations")
    assert g["total"] == pytest.approx(sum(g[k] for k in parts))
    assert plan["flops_per_sample"]["executed"] > plan["flops_per_sample"]["total"]  # recomputation
    assert "FLOPs per sample" in text and "largest micro batch on 80 GiB" in text


def test_plan_of_an_untraceable_model_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(SegConnector, "forward", lambda self, feats: [f * float(f.sum()) for f in feats])
    assert run_cli(train.main, ["--stage", "1", "--flavor", "debug", "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "module seg_connector failed" in err[0]


# ---------------------------------------------------------------------------------------------- mfu
@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("Tesla T4", None),
    ],
)
def test_device_table(name, peak):
    assert se.peak_flops(name) == peak
    assert se.peak_flops(name, override_tflops=500) == 500e12


def test_mfu_arithmetic():
    f = se.efficiency_fields(989e12 * 0.5 * 2.0, 2.0, 989e12, 3 * GiB)
    assert f == {"mfu": pytest.approx(0.5), "flops_per_step": 989e12, "gpu/peak_mem_gib": 3.0}
    assert se.efficiency_fields(1e15, 2.0, None, GiB) == {"gpu/peak_mem_gib": 1.0}  # unknown GPU: no mfu
    with pytest.raises(ValueError):
        se.peak_flops("NVIDIA H100", override_tflops=0)


def test_no_mfu_on_cpu():
    assert se.StepEfficiency.create(torch.device("cpu")) is None
    assert se.step_fields(None, 1.0) == {}
    with se.counting(None):
        pass


def test_peak_tflops_flag_reaches_the_tracking_config():
    args, _ = train.parse_args(["--stage", "1", "--print-config", "--peak-tflops", "400"])
    cfg = train.build_config(args)
    assert cfg.tracking.peak_tflops == 400
    with pytest.raises(StageConfigError):
        TrackingConfig(peak_tflops=-1)


@pytest.mark.gpu
def test_step_efficiency_on_a_gpu():  # GPU only
    dev = torch.device("cuda")
    eff = se.StepEfficiency.create(dev, override_tflops=100)
    x = torch.randn(256, 512, device=dev, requires_grad=True)
    w = torch.randn(512, 128, device=dev, requires_grad=True)
    with eff.counting():
        (x @ w).sum().backward()
    f = eff.fields(0.5)
    assert f["flops_per_step"] == 3 * 2 * 256 * 512 * 128 and f["mfu"] == pytest.approx(
        f["flops_per_step"] / 0.5 / 100e12
    )
    assert f["gpu/peak_mem_gib"] > 0
