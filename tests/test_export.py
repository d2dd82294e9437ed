"""The exported LoRA reproduces the fine-tuned model in plain diffusers; `python -m sqdf_fast.sample` writes a grid."""
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from sd_fixtures import TINY_RESOLUTION, make_tiny_pipeline, tiny_sd_config

from sqdf_fast import checkpoint, export, sample, tasks
from sqdf_fast.adapters import POLICY, add_policy_lora, load_adapter_state_dict
from sqdf_fast.train import run

PROMPT = "a photo of a red fox"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SD pipeline and a 2-step run on it with the task's own reward, LoRA alpha != rank so the exported
    scale matters."""
    root = tmp_path_factory.mktemp("export")
    model = make_tiny_pipeline(root / "pipeline")
    cfg = tiny_sd_config(model, root / "run", steps=2, lr=0.05, lora_rank=4, lora_alpha=8.0)
    run(cfg)
    return model, cfg, root / "run"


def fine_tuned_unet(cfg, run_dir):
    """The run's policy: the task's UNet with the checkpoint's adapter."""
    task = tasks.resolve(cfg.task)(cfg)
    add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    adapter, _ = checkpoint.load(run_dir)
    load_adapter_state_dict(task.unet, adapter)
    return task.unet.eval()


def generate(pipeline, seed: int = 0):
    return pipeline([PROMPT, ""], num_inference_steps=3, guidance_scale=2.0, eta=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(seed), height=TINY_RESOLUTION,
                    width=TINY_RESOLUTION).images


def test_run_writes_a_diffusers_lora_that_reproduces_the_fine_tuned_samples(trained):
    model, cfg, run_dir = trained
    lora_file = run_dir / "lora" / export.LORA_FILE
    assert lora_file.is_file()
    with safe_open(str(lora_file), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("unet.") for k in keys) and not any(".lcm." in k or POLICY in k for k in keys)
    assert metadata   # the LoRA config (alpha 8 for rank 4) travels with the weights

    with_lora = sample.load_pipeline(str(model), torch.device("cpu"))
    with_lora.load_lora_weights(str(run_dir / "lora"))
    ours = sample.load_pipeline(str(model), torch.device("cpu"))
    ours.unet = fine_tuned_unet(cfg, run_dir)
    base = sample.load_pipeline(str(model), torch.device("cpu"))
    expected = generate(ours)
    torch.testing.assert_close(generate(with_lora), expected, atol=1e-5, rtol=1e-4)
    assert (generate(base) - expected).abs().max() > 1e-3   # the fine-tuning changed the samples


def test_export_from_a_checkpoint_equals_the_runs_export(trained, tmp_path):
    _, _, run_dir = trained
    path = export.export_run(run_dir, tmp_path / "again")
    with safe_open(str(path), "pt") as a, safe_open(str(run_dir / "lora" / export.LORA_FILE), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    with pytest.raises(ValueError, match="run_dir=.*no config.json"):
        export.export_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="run_dir=.*no checkpoint"):
        export.export_run(tmp_path / "empty")


def test_sample_cli_writes_a_grid(trained, tmp_path, capsys):
    model, _, run_dir = trained
    out = tmp_path / "grid.png"
    sample.main(["--model", str(model), "--lora", str(run_dir / "lora"), "--prompts", "a cat; a dog",
                 "--per-prompt", "3", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert "2 prompts x 3 images" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert (width, height) == (3 * (TINY_RESOLUTION + 1) + 1, 2 * (TINY_RESOLUTION + 1) + 1)
    for argv, message in ((["--model", str(model), "--lora", "/nowhere"], "--lora /nowhere: not a LoRA"),
                          (["--model", str(tmp_path / "missing")], "missing: no such folder")):
        with pytest.raises(SystemExit) as err:   # usage errors: exit 2 with one error line
            sample.main(argv + ["--out", str(out)])
        assert err.value.code == 2 and message in capsys.readouterr().err
