import pytest
import torch

from scale.convert_checkpoint import convert
from scale.errors import CheckpointError
from scale.models import build_moco, build_vit
from scale.models.formats import (
    export_timm_state_dict,
    load_backbone,
    load_moco_checkpoint,
    official_state,
    save_atomic,
    timm_kwargs,
)
from tests.helpers import TINY_HEADS, TINY_VIT


def trained_moco(seed: int = 0):
    torch.manual_seed(seed)
    model = build_moco("vit_small", **TINY_HEADS, **TINY_VIT)
    with torch.no_grad():  # make the encoders differ, as after training
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def views():
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)


def test_official_format_round_trip_gives_the_same_loss(tmp_path):
    model = trained_moco(0)
    state = official_state(model, epoch=300, arch="vit_small")
    assert all(
        k.startswith(("module.base_encoder.", "module.momentum_encoder.", "module.predictor."))
        for k in state["state_dict"]
    )
    assert "module.base_encoder.head.0.weight" in state["state_dict"]  # projector stored as the head
    assert not any(k.startswith("module.momentum_encoder.head.") and "predictor" in k for k in state["state_dict"])
    path = tmp_path / "checkpoint_0299.pth.tar"
    save_atomic(state, path)

    fresh = trained_moco(1)
    x1, x2 = views()
    assert not torch.equal(fresh(x1, x2), model(x1, x2))
    load_moco_checkpoint(fresh, path)
    torch.testing.assert_close(fresh(x1, x2), model(x1, x2), rtol=0, atol=0)


def test_backbone_alone_from_official_checkpoint():
    model = trained_moco(0)
    state = official_state(model)
    for encoder in ("base_encoder", "momentum_encoder"):
        backbone = build_vit("vit_small", **TINY_VIT).eval()
        load_backbone(backbone, state, encoder=encoder)
        src = getattr(model, encoder).eval()
        x = views()[0]
        with torch.no_grad():
            torch.testing.assert_close(backbone(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_timm_state_dict_with_classifier_loads_into_backbone():
    cfg = build_vit("vit_small", **TINY_VIT).cfg
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {**timm_kwargs(cfg), "num_classes": 10}
    timm_model = VisionTransformer(**kwargs).eval()
    ours = build_vit("vit_small", **TINY_VIT).eval()
    load_backbone(ours, {"model": timm_model.state_dict()})  # DeiT-style wrapping, head dropped
    x = views()[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_model.forward_head(timm_model.forward_features(x), pre_logits=True))


def test_wrong_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    deeper = build_vit("vit_small", **{**TINY_VIT, "depth": 3})
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.2\."):
        load_backbone(build_vit("vit_small", **TINY_VIT), deeper.state_dict())
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\."):
        load_backbone(deeper, build_vit("vit_small", **TINY_VIT).state_dict())
    wider = build_vit("vit_small", **{**TINY_VIT, "embed_dim": 64})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_backbone(build_vit("vit_small", **TINY_VIT), wider.state_dict())
    with pytest.raises(CheckpointError, match="not a MoCo v3 checkpoint"):
        load_moco_checkpoint(trained_moco(), deeper.state_dict())
    with pytest.raises(CheckpointError, match="no tensors"):
        load_backbone(deeper, {"epoch": 3})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(deeper, tmp_path / "nope.pth")


def test_converter_cli_writes_a_timm_loadable_backbone(tmp_path):
    model = trained_moco(0)
    import timm

    src, dst = tmp_path / "moco.pth.tar", tmp_path / "timm"
    save_atomic(official_state(model, arch="vit_small"), src)
    convert(src, dst, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)  # 'arch' names the model
    timm_model = timm.create_model(f"local-dir:{dst}", pretrained=True).eval()  # the folder alone builds it
    assert timm_model.blocks[0].attn.num_heads == 4
    x = views()[0]
    base = model.base_encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), base.forward_head(base.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="pass --model"):
        save_atomic(official_state(model, arch="convnext_tiny"), src)
        convert(src, tmp_path / "timm2")  # a new name: an existing DST is refused before SRC is read


def test_export_is_detached_and_headless():
    model = trained_moco(0)
    sd = export_timm_state_dict(model)
    assert not any(k.startswith("head.") for k in sd)
    assert all(not v.requires_grad for v in sd.values())
    sd["cls_token"].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(sd["cls_token"], model.base_encoder.cls_token)


def test_timm_avg_pool_with_fc_norm_is_refused():
    from timm.models.vision_transformer import VisionTransformer

    ours = build_vit("vit_small", pool="avg", **TINY_VIT)
    kwargs = {**timm_kwargs(ours.cfg), "fc_norm": None, "final_norm": True}  # timm's own avg default
    timm_model = VisionTransformer(**kwargs)
    with pytest.raises(CheckpointError, match="fc_norm"):
        load_backbone(ours, timm_model.state_dict())


def test_deepspeed_momentum_masters_load_onto_this_processs_device(tmp_path, monkeypatch):
    """Masters saved on cuda:5 of an 8-GPU node resume where that device does not exist (here: a
    CPU-only process); a different partition layout is a clear error."""
    from types import SimpleNamespace

    import torch.serialization

    from scale.errors import BackendError
    from scale.parallel.deepspeed import DeepSpeedBackend

    masters = [torch.randn(4, 3), torch.randn(5)]
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:5")
        torch.save(masters, tmp_path / "momentum-master-rank0.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading without a map_location did
        torch.load(tmp_path / "momentum-master-rank0.pt", weights_only=True)

    backend = object.__new__(DeepSpeedBackend)
    backend.device, backend.stage = torch.device("cpu"), 2
    pairs = ([torch.zeros(4, 3), torch.zeros(5)], [torch.zeros(4, 3), torch.zeros(5)])
    backend.module = SimpleNamespace(momentum_pairs=lambda: pairs)
    loaded = backend._load_masters(tmp_path / "momentum-master-rank0.pt")
    assert all(a.device.type == "cpu" and torch.equal(a, b) for a, b in zip(loaded, masters, strict=True))
    other = ([torch.zeros(2, 3), torch.zeros(5)], pairs[1])
    backend.module = SimpleNamespace(momentum_pairs=lambda: other)
    with pytest.raises(BackendError, match="another layout"):
        backend._load_masters(tmp_path / "momentum-master-rank0.pt")
    assert backend._load_masters(tmp_path / "missing.pt") is None


def _run_checkpoint(tmp_path):
    """A real run checkpoint of the tiny model (single process, 2 steps)."""
    from scale.train.trainer import Trainer
    from tests.helpers import FixedBatchLoader, tiny_config

    trainer = Trainer(tiny_config(tmp_path, "run", **{"schedule.max_steps": 2}), loader=FixedBatchLoader(4, 8))
    trainer.fit()
    return tmp_path / "run", trainer.backend.module


def test_converter_writes_each_format_as_its_consumer_loads_it(tmp_path):
    """timm (a strict load, with --num-classes too), DeiT ({'model': ...}, loaded non-strictly by
    DeiT's main.py: only the classifier missing), the authors' MoCo layout (main_lincls.py's key
    filter: only the classifier missing), all from a run checkpoint of this project."""
    from timm.models.vision_transformer import VisionTransformer

    run, moco = _run_checkpoint(tmp_path)
    cfg = moco.base_encoder.cfg
    base = {k: v for k, v in moco.base_encoder.state_dict().items() if not k.startswith("head.")}

    from scale.models.export import export_state_dict, read_export_meta

    convert(run, tmp_path / "t")
    timm_sd = export_state_dict(tmp_path / "t")
    assert set(timm_sd) == set(base) and all(torch.equal(timm_sd[k], base[k]) for k in base)
    VisionTransformer(**timm_kwargs(cfg)).load_state_dict(timm_sd)
    assert read_export_meta(tmp_path / "t")["source"] == str(run)
    convert(run, tmp_path / "t10", num_classes=10)
    with_head = export_state_dict(tmp_path / "t10")
    VisionTransformer(**{**timm_kwargs(cfg), "num_classes": 10}).load_state_dict(with_head, strict=True)
    assert torch.all(with_head["head.weight"] == 0)

    convert(run, tmp_path / "d.pth", fmt="deit")
    deit = torch.load(tmp_path / "d.pth", weights_only=True)
    assert deit["arch"] == "vit_small" and deit["model_args"]["num_heads"] == cfg.num_heads
    msg = VisionTransformer(**{**timm_kwargs(cfg), "num_classes": 1000}).load_state_dict(deit["model"], strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys

    convert(run, tmp_path / "m.pth.tar", fmt="moco")
    ckpt = torch.load(tmp_path / "m.pth.tar", weights_only=True)
    assert ckpt["arch"] == "vit_small" and ckpt["epoch"] == 0
    state_dict = ckpt["state_dict"]  # main_lincls.py, as written by the authors:
    for k in list(state_dict):
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.head"):
            state_dict[k[len("module.base_encoder.") :]] = state_dict[k]
        del state_dict[k]
    msg = VisionTransformer(**{**timm_kwargs(cfg), "num_classes": 1000}).load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys
    assert all(torch.equal(state_dict[k], base[k]) for k in base)
    with pytest.raises(ValueError, match="--format"):
        convert(run, tmp_path / "x", fmt="onnx")


def test_deit_format_refuses_a_vit_s_with_12_heads(tmp_path):
    """MoCo v3's ViT-S has 12 heads; DeiT-S (and timm's vit_small) 6, with the same weight shapes: a
    DeiT export would load and compute something else. The timm export folder carries the 12."""
    model = build_moco("vit_small", img_size=32)
    src = tmp_path / "moco.pth.tar"
    save_atomic(official_state(model, arch="vit_small"), src)
    with pytest.raises(ValueError, match="12 heads but DeiT"):
        convert(src, tmp_path / "d.pth", fmt="deit", img_size=32)
    assert not (tmp_path / "d.pth").exists()


def test_a_universal_resume_restores_the_fp32_momentum_masters(tmp_path):
    """DeepSpeed's universal format holds the trained parameters only: the momentum encoder and its
    fp32 masters come from the original checkpoint's files. A bf16 run's masters were left at None
    (then rebuilt from the bf16 parameters, losing their low bits)."""
    from torch import nn

    from scale.parallel.deepspeed import DeepSpeedBackend

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(3, 2).bfloat16(), nn.Linear(3, 2).bfloat16().requires_grad_(False)

        def momentum_pairs(self):
            return list(self.k.parameters()), list(self.q.parameters())

    module = Pair()
    (tmp_path / "engine").mkdir()
    torch.save({"module": module.state_dict()}, tmp_path / "engine" / "mp_rank_00_model_states.pt")
    masters = [p.detach().float() + 1e-4 for p in module.k.parameters()]  # below bf16's resolution
    torch.save(masters, tmp_path / "momentum-master.pt")
    backend = object.__new__(DeepSpeedBackend)
    backend.device, backend.stage, backend.rank, backend.dtype = torch.device("cpu"), 2, 1, torch.bfloat16
    backend.module, backend._momentum_masters = module, None
    backend._restore_untrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(backend._momentum_masters, masters, strict=True))
