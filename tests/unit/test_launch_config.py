"""Every JobSpec field the trainer needs reaches TrainConfig under the right name."""
from scheduler.executor import LaunchRequest
from scheduler.ray_executor import train_config
from scheduler.spec import JobSpec
from trainer.config import TrainConfig


def test_full_spec_maps_onto_train_config():
    spec = JobSpec.model_validate({
        "name": "j", "team": "a", "model": "/m", "method": "lora",
        "dataset": {"train": "/t.jsonl", "validation_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "hyperparameters": {"learning_rate": 0.01, "epochs": 2, "max_steps": 7, "batch_size": 3,
                            "grad_accum_steps": 2, "max_length": 99, "warmup_steps": 1,
                            "lr_scheduler": "linear", "weight_decay": 0.1, "max_grad_norm": 0.5, "seed": 5},
        "resources": {"gpus": 2, "cpus_per_gpu": 3}, "checkpoint_every_steps": 11,
    })
    req = LaunchRequest(job_id=4, attempt=2, spec=spec.model_dump(mode="json"), node_id="n",
                        gpu_indices=(3, 5), memory_per_gpu_mib=1, job_dir="/jobs/4", output_dir="/out")
    cfg = TrainConfig.model_validate(train_config(req))
    assert (cfg.job_id, cfg.attempt, cfg.gpu_indices, cfg.torch_threads) == (4, 2, [3, 5], 3)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) == (4, 8, 0.1, ["q_proj", "v_proj"])
    assert (cfg.learning_rate, cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.grad_accum_steps) == (0.01, 2, 7, 3, 2)
    assert (cfg.max_length, cfg.warmup_steps, cfg.lr_scheduler, cfg.weight_decay) == (99, 1, "linear", 0.1)
    assert (cfg.max_grad_norm, cfg.seed, cfg.checkpoint_every_steps) == (0.5, 5, 11)
    assert (cfg.val_path, cfg.val_fraction, cfg.output_dir, cfg.scratch_dir) == (None, 0.2, "/out", "/jobs/4/scratch")


def test_a_chosen_output_gets_a_per_job_folder_and_the_storage_root(tmp_path, monkeypatch):
    from tests.unit.test_service import World

    monkeypatch.setenv("SHOAL_STORAGE_ROOT", str(tmp_path / "root"))
    w = World(tmp_path)
    try:
        chosen = w.store.submit(spec={"name": "j", "dataset": {"train": "/t.jsonl"}, "model": "/m",
                                                      "output": str(tmp_path / "root" / "models")}, name="j",
                                team="a", user="u", priority=0, gpus=1, memory_per_gpu_mib=1000, now=0)
        default = w.store.submit(spec={"name": "k"}, name="k", team="a", user="u", priority=0, gpus=1,
                                 memory_per_gpu_mib=1000, now=0)
        w.service.tick()
        reqs = {r.req.job_id: r.req for r in w.executor.runs.values()}
        assert reqs[chosen.id].output_dir == f"{tmp_path / 'root' / 'models'}/job-{chosen.id}"
        assert reqs[chosen.id].storage_root == str((tmp_path / "root").resolve())
        assert reqs[default.id].output_dir.endswith(f"/{default.id}/output")
        assert reqs[default.id].storage_root is None  # the scheduler's own job folder
        assert train_config(reqs[chosen.id])["storage_root"] == reqs[chosen.id].storage_root
    finally:
        w.store.close()
