import pytest

from scale.config import Config, ConfigError, apply_overrides, config_from_dict, derive, describe
from scale.recipes import PAPER_ACCURACY, RECIPES, get_recipe


def test_overrides_are_type_checked_and_name_valid_keys():
    overrides = ["--optim.base_lr=1e-4", "batch.global_batch_size=2048", "--optim.betas=0.9,0.95",
                 "--model.patch_size=14", "--model.use_bn=true", "--optim.final_weight_decay=none"]  # fmt: skip
    cfg = apply_overrides(Config(), overrides)
    assert cfg.optim.base_lr == 1e-4 and cfg.batch.global_batch_size == 2048 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.patch_size == 14 and cfg.model.use_bn is True and cfg.optim.final_weight_decay is None
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lr_base'; valid keys of \[optim\]: .*base_lr"):
        apply_overrides(Config(), ["--optim.lr_base=1"])
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'.*sections: model, data"):
        apply_overrides(Config(), ["--optimizer.base_lr=1"])
    with pytest.raises(ConfigError, match="batch.global_batch_size is an int, got '4096.5'"):
        apply_overrides(Config(), ["--batch.global_batch_size=4096.5"])
    with pytest.raises(ConfigError, match="is a bool"):
        apply_overrides(Config(), ["--run.progress=maybe"])
    with pytest.raises(ConfigError, match="needs a value"):
        apply_overrides(Config(), ["--run.progress"])
    with pytest.raises(ConfigError, match="2 comma-separated values"):
        apply_overrides(Config(), ["--optim.betas=0.9"])


def test_config_round_trips_through_json():
    cfg = apply_overrides(get_recipe("vit_h_300ep"), ["--optim.betas=0.9,0.95"])
    import json

    assert config_from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("name", [n for n in RECIPES if n.startswith("vit") and n.endswith("300ep")])
def test_paper_recipes_have_the_papers_hyperparameters(name):
    cfg = get_recipe(name)
    assert cfg.batch.global_batch_size == 4096
    assert cfg.optim.name == "adamw" and cfg.optim.base_lr == 1.5e-4 and cfg.optim.weight_decay == 0.1
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.clip_grad == 0 and not cfg.optim.exclude_norm_bias_from_wd
    assert cfg.schedule.epochs == 300 and cfg.schedule.warmup_epochs == 40
    assert cfg.schedule.momentum == 0.99 and cfg.schedule.final_momentum == 1.0
    assert cfg.model.temperature == 0.2 and cfg.model.dim == 256 and cfg.model.mlp_dim == 4096
    assert cfg.model.random_patch_proj and cfg.model.pos_embed == "sincos"
    d = derive(cfg, world_size=512, num_samples=1_281_167)
    assert d.lr == pytest.approx(2.4e-3) and d.batch_size_per_device == 8
    assert d.steps_per_epoch == 312 and d.warmup_steps == 40 * 312 and d.total_steps == 300 * 312
    assert name in PAPER_ACCURACY


def test_recipe_models():
    assert get_recipe("vit_h_300ep").model.name == "vit_huge"
    assert get_recipe("vit_bn_l7_300ep").model.name == "vit_bn_large_p7"
    lamb = get_recipe("vit_b_lamb_100ep")
    assert lamb.optim.name == "lamb" and lamb.optim.base_lr == 5e-4 and lamb.optim.weight_decay == 1e-3
    with pytest.raises(ConfigError, match="unknown recipe 'vit_g'; choose one of: cpu_demo"):
        get_recipe("vit_g")


def test_batch_split_is_validated():
    cfg = get_recipe("vit_b_300ep")
    with pytest.raises(ConfigError, match="does not split into 3 rank"):
        derive(cfg, world_size=3, num_samples=10**6)
    cfg.batch.grad_accum_steps = 4
    d = derive(cfg, world_size=8, num_samples=10**6)
    assert d.batch_size_per_device == 128 and d.negatives_per_loss == 4096  # every micro-batch's keys
    cfg.batch.keys = "micro"
    assert derive(cfg, world_size=8, num_samples=10**6).negatives_per_loss == 1024  # micro-batch x world
    cfg.batch.batch_size_per_device = 100
    with pytest.raises(ConfigError, match="100 per device"):
        derive(cfg, world_size=8, num_samples=10**6)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        derive(get_recipe("vit_b_300ep"), world_size=8, num_samples=1000)


def test_describe_lists_every_field_with_its_docstring():
    text = describe(Config())
    assert "--optim.base_lr=0.00015  Learning rate per 256 images" in text
    assert "[schedule]" in text and "--run.resume='auto'" in text


def test_default_run_name_separates_backends_and_resumes_the_same_command():
    from scale.config import apply_overrides, default_run_name
    from scale.recipes import get_recipe

    def name(*overrides):
        return default_run_name(apply_overrides(get_recipe("cpu_demo"), list(overrides)))

    assert name() == "cpu_demo" == name("--parallel.backend=ddp")  # replicated: one run directory
    assert name("--parallel.backend=deepspeed", "--parallel.deepspeed_config=ds_configs/zero2.json") == "cpu_demo-zero2"
    assert name("--parallel.backend=fsdp") == "cpu_demo-fsdp"
    assert name("--run.name=mine", "--parallel.backend=fsdp") == "mine"
    assert default_run_name(get_recipe("vit_h_300ep")) == "vit_h_300ep"


def test_renamed_knn_fields_keep_old_flags_and_old_run_directories_working(tmp_path):
    """One set of kNN settings (`monitor.knn_*`) for both kNN monitors: the old `run.knn_*` flags
    still set them, a config.json written before the rename reads back, and its run resumes."""
    import json

    from scale.train.run_dir import check_run_dir

    cfg = apply_overrides(get_recipe("cpu_demo"), ["--run.knn_k=7", "--run.knn_temperature=0.1",
                                                   "--run.knn_every_epochs=2"])  # fmt: skip
    assert (cfg.monitor.knn_k, cfg.monitor.knn_temperature, cfg.monitor.heldout_every_epochs) == (7, 0.1, 2)
    old = json.loads(get_recipe("cpu_demo").to_json())  # a config.json of before the rename
    old["run"].update(knn_k=20, knn_temperature=0.07, knn_every_epochs=0, name="cpu_demo")
    del old["monitor"]["heldout_every_epochs"]
    cfg = get_recipe("cpu_demo")
    cfg.run.name = "cpu_demo"  # as the trainer resolves it before writing config.json
    assert config_from_dict(old) == cfg
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_run_dir(tmp_path, cfg)  # the same run: resumable
    cfg.optim.base_lr = 1.0
    with pytest.raises(ConfigError, match="holds a different config .*optim.base_lr"):
        check_run_dir(tmp_path, cfg)


def test_every_rule_sits_beside_its_field():
    """The rules are declared with the fields (`setting`): RULES is read from the dataclasses."""
    import dataclasses

    from scale.config import RULES
    from scale.config.rules import field_rule
    from scale.config.schema import sections

    beside = {f"{name}.{f.name}" for name, s in sections(Config()).items() for f in dataclasses.fields(s)
              if field_rule(f) is not None}  # fmt: skip
    assert beside == set(RULES) and len(RULES) > 50
