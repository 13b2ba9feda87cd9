"""The GPU paths a CPU cannot check: fp16 with a CUDA GradScaler, bf16 on CUDA, channels-last and compilation on CUDA,
batch augmentation on the device and pinned host batches.

Marked ``gpu`` and skipped without CUDA; ``benchmarks/gpu_check.py`` runs them (``pytest -m gpu``) on a GPU machine.
``LIGHTNING_CIL_GPU_TESTS_ON_CPU=1`` runs them on a CPU instead, to check the tests themselves: fp16 through Lightning's
CPU GradScaler plugin, no pinned-memory check, no compilation (minutes on a CPU).
"""

import os

import lightning as L
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from test_contract import CASES
from test_precision import DEFAULT_SUITE, _model_and_stream

import lightning_cil.methods as methods
from lightning_cil import run_stream
from lightning_cil.callbacks import ChannelsLast, CompileBackbone
from lightning_cil.callbacks.speed import compile_targets

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu" if os.environ.get("LIGHTNING_CIL_GPU_TESTS_ON_CPU") == "1" else None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU; benchmarks/gpu_check.py runs these on one"),
]
ACCELERATOR = "gpu" if CUDA else "cpu"


def _ids(case):
    return case.__name__ if isinstance(case, type) else str(case)


def _trainer(root, **overrides) -> L.Trainer:
    # CUDA has no deterministic kernel for some backward passes (adaptive average pooling): not deterministic here
    return make_trainer(root, accelerator=ACCELERATOR, deterministic=False, **overrides)


def _fp16_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    return MixedPrecision("16-mixed", DEVICE, scaler=torch.amp.GradScaler(DEVICE, init_scale=init_scale))


class _Probe(L.Callback):
    """What the training steps saw: a convolution's output dtype and layout, and the host-side training batches."""

    def __init__(self, model: L.LightningModule, dm: L.LightningDataModule) -> None:
        self.dm = dm
        self.outputs: set[tuple[torch.dtype, bool]] = set()
        self.host_batches: set[tuple[torch.dtype, bool]] = set()
        # not the stem: with one input channel its weight is both contiguous and channels-last
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        conv.register_forward_hook(self._record_output)
        dm.on_before_batch_transfer = self._record_host_batch  # the batch as the loader hands it over

    def _record_output(self, module, inputs, out) -> None:
        if module.training:
            self.outputs.add((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))

    def _record_host_batch(self, batch, dataloader_idx: int):
        if self.dm.trainer.training:
            self.host_batches.add((batch[0].dtype, batch[0].is_pinned()))
        return batch


def _count_scaler_steps(trainer: L.Trainer) -> list[int]:
    scaler = trainer.precision_plugin.scaler
    calls, step = [0], scaler.step

    def counted(*args, **kwargs):
        calls[0] += 1
        return step(*args, **kwargs)

    scaler.step = counted
    return calls


def _float_states(model):
    return [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]


def _channels_last(model) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


@pytest.mark.parametrize(("cls", "options"), CASES, ids=_ids)
def test_16_mixed_with_channels_last_and_device_augmentation_steps_the_scaler_and_resumes_its_scale(
    cls, options, tmp_path
):
    L.seed_everything(0)
    model, dm = _model_and_stream(cls, options, gpu_augmentation=True)
    probe = _Probe(model, dm)
    precision = {"precision": "16-mixed"} if CUDA else {"plugins": [_fp16_plugin()]}
    trainer = _trainer(tmp_path, callbacks=[ChannelsLast(), probe], **precision)
    steps = _count_scaler_steps(trainer)
    run_stream(trainer, model, dm)

    assert model.task_index == 2 and trainer.precision == "16-mixed"
    assert steps[0] == trainer.global_step > 0  # every optimizer step went through the GradScaler
    assert probe.outputs == {(torch.float16, True)}  # fp16 autocast, channels-last activations
    assert probe.host_batches == {(torch.uint8, CUDA)}  # uint8 (augmented on the device), pinned on CUDA
    assert _channels_last(model)  # also what the task starts grew or replaced
    assert all(t.dtype == torch.float32 for _, t in _float_states(model))
    scale = trainer.precision_plugin.scaler.get_scale()
    assert 0 < scale < float("inf")
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["MixedPrecision"]["scale"] == scale

    # resume from the checkpoint with a scaler that starts elsewhere: the saved scale replaces it. Same layout as
    # the first run, so that its fp16 evaluation runs the same kernels
    fresh, fresh_dm = _model_and_stream(cls, options, gpu_augmentation=True)
    resumed = _trainer(tmp_path / "resume", plugins=[_fp16_plugin(init_scale=8.0)], callbacks=[ChannelsLast()])
    run_stream(resumed, fresh, fresh_dm, ckpt_path=ckpt)
    assert resumed.precision_plugin.scaler.get_scale() == scale
    resumed.test(fresh, datamodule=fresh_dm, verbose=False)
    recorded = {name: counts["correct"] for name, counts in model.last_evaluation.items()}
    assert {name: counts["correct"] for name, counts in fresh.last_evaluation.items()} == recorded


@pytest.mark.parametrize(("cls", "options"), DEFAULT_SUITE, ids=_ids)
def test_bf16_mixed_on_the_device_keeps_weights_memory_and_class_means_in_fp32(cls, options, tmp_path):
    L.seed_everything(0)
    model, dm = _model_and_stream(cls, options, gpu_augmentation=True)
    probe = _Probe(model, dm)
    run_stream(_trainer(tmp_path, precision="bf16-mixed", callbacks=[probe]), model, dm)

    assert model.task_index == 2 and {dtype for dtype, _ in probe.outputs} == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for _, t in _float_states(model))
    memory = getattr(model, "memory", None)
    if memory is not None:
        assert len(memory) == 60
    if isinstance(model, methods.ICaRL):
        assert model.class_means.dtype == torch.float32
    samples = dm.train_subset(torch.arange(64))
    plain = model.extract_features(samples)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under_autocast = model.extract_features(samples)
    assert under_autocast.dtype == torch.float32 and torch.equal(plain, under_autocast)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: compilation takes minutes on a CPU")
def test_compiled_channels_last_der_compiles_every_extractor_and_matches_eager(tmp_path):
    """DER grows an extractor per task: each is compiled at its task's fit, and computes what the eager one does."""
    L.seed_everything(0)
    model, dm = _model_and_stream(methods.DER, {}, gpu_augmentation=True)
    trainer = _trainer(tmp_path, precision="bf16-mixed", callbacks=[ChannelsLast(), CompileBackbone()])
    run_stream(trainer, model, dm)

    targets = compile_targets(model)
    assert len(targets) == 3 and all(extractor._compiled_call_impl is not None for _, extractor in targets)
    assert _channels_last(model)
    images = torch.randn(16, 1, 8, 8, device="cuda")
    model.to("cuda").eval()
    with torch.no_grad():
        for name, extractor in targets:
            torch.testing.assert_close(extractor(images), extractor.forward(images), rtol=1e-2, atol=1e-2, msg=name)
