"""benchmarks/gpu_carry.py: a run and every run its config records are mirrored at their absolute paths."""
from pathlib import Path

import yaml

from benchmarks.gpu_carry import mirror


def _run(folder: Path, config: dict) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (folder / "model.safetensors").write_bytes(b"w")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_mirror_follows_recorded_runs_and_skips_checkpoints(tmp_path):
    tok = _run(tmp_path / "tok", {"kind": "fsq"})
    gen = _run(tmp_path / "gen", {"kind": "gpt", "tokenizer": {"path": str(tok), "hash": "h"}})
    head = _run(tmp_path / "head", {"kind": "drafter", "generator": [str(gen)]})
    (tmp_path / "link").symlink_to(gen)
    dest = tmp_path / "carry"
    mirror([head, tmp_path / "link"], dest)
    for run in (tok, gen, head):
        copy = dest / "root" / str(run).lstrip("/")
        assert (copy / "model.safetensors").read_bytes() == b"w" and (copy / "config.yaml").is_file()
        assert not (copy / "checkpoints").exists()
    assert (dest / "aliases").read_text() == f"{tmp_path / 'link'} {gen}\n"
