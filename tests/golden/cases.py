"""Fixed-seed short runs of every trainer, reduced to per-tensor fingerprints (issue 17 item 6).

``python -m tests.golden.cases`` writes ``tests/golden/golden.json`` from the code as it is, recorded on this
machine kind; ``python -m tests.golden.cases --add`` adds this machine kind's record to the file instead, after
checking that it agrees with the records there (same code, other CPU kernels). The test compares today's code with
the file. A fingerprint is the SHA-256 of the tensor's bytes (bit for bit) plus its float64 sum and absolute sum
(for a machine kind with no record, whose CPU kernels round differently, see the test).
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden.json")
STEPS = "3"
NAMES = ("lora_sd1", "lora_sdxl", "dreambooth", "fine_tune", "textual_inversion")
# metadata that differs between two identical runs (clock, random session id) or names the temp folder
VOLATILE = ("ss_training_started_at", "ss_training_finished_at", "ss_session_id", "modelspec.date",
            "ss_sd_scripts_commit_hash")  # the last: this checkout's git HEAD


def _data(tmp: Path) -> tuple[Path, Path, Path]:
    """A DreamBooth folder, its image folder and a fine-tune metadata JSON (captions by file stem)."""
    from tests.training.train_helpers import make_shapes_folder

    root = make_shapes_folder(tmp / "data", repeats=2, n=3)
    images = root / "2_sks shape"
    meta = tmp / "meta.json"
    meta.write_text(json.dumps({p.stem: {"caption": f"a photo of a sks shape, number {p.stem}"}
                                for p in sorted(images.glob("*.png"))}), encoding="utf-8")
    return root, images, meta


def _common(model: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--resolution", "64", "--output_dir", str(out),
            "--max_train_steps", STEPS, "--seed", "7", "--max_data_loader_n_workers", "0", "--console_log_simple"]


def cases(tmp: Path) -> dict[str, tuple]:
    """name -> (script module name, argv, saved file name); the names are NAMES."""
    from tools.make_tiny_model import write_tiny_model

    sd1 = write_tiny_model("sd1", tmp / "m")["safetensors"]
    sdxl = write_tiny_model("sdxl", tmp / "m")["safetensors"]
    root, images, meta = _data(tmp)
    lora = ["--train_data_dir", str(root), "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "2", "--learning_rate", "1e-3", "--output_name", "lora"]
    return {
        "lora_sd1": ("train_network", [*_common(sd1, tmp / "lora_sd1"), *lora, "--noise_offset", "0.05",
                                       "--min_snr_gamma", "5", "--shuffle_caption"], "lora.safetensors"),
        "lora_sdxl": ("sdxl_train_network", [*_common(sdxl, tmp / "lora_sdxl"), *lora, "--cache_latents",
                                             "--cache_text_encoder_outputs", "--network_train_unet_only"],
                      "lora.safetensors"),
        "dreambooth": ("train_db", [*_common(sd1, tmp / "db"), "--train_data_dir", str(root), "--learning_rate",
                                    "1e-3", "--output_name", "db", "--save_model_as", "safetensors"],
                       "db.safetensors"),
        "fine_tune": ("fine_tune", [*_common(sd1, tmp / "ft"), "--train_data_dir", str(images), "--in_json",
                                    str(meta), "--train_text_encoder", "--learning_rate", "1e-3", "--output_name",
                                    "ft", "--save_model_as", "safetensors"], "ft.safetensors"),
        "textual_inversion": ("train_textual_inversion", [*_common(sd1, tmp / "ti"), "--train_data_dir", str(root),
                                                          "--token_string", "sks", "--init_word", "shape",
                                                          "--num_vectors_per_token", "2", "--learning_rate", "1e-2",
                                                          "--output_name", "ti", "--save_model_as", "safetensors"],
                              "ti.safetensors"),
    }


def fingerprint(path: Path, tmp: Path) -> dict[str, list]:
    """Per tensor: [sha256, dtype, shape, sum, abs sum]; the file's metadata under "__metadata__"."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    out: dict = {"__metadata__": {k: v.replace(str(tmp), "<tmp>") for k, v in sorted(meta.items())
                                  if k not in VOLATILE}}
    for k, v in sorted(load_file(str(path)).items()):
        t = v.contiguous().reshape(-1)
        digest = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
        d = t.double()
        out[k] = [digest, str(v.dtype), list(v.shape), d.sum().item(), d.abs().sum().item()]
    return out


def run_case(name: str, tmp: Path) -> dict[str, list]:
    import importlib

    script, argv, saved = cases(tmp)[name]
    importlib.import_module(script).main(argv)
    return fingerprint(Path(argv[argv.index("--output_dir") + 1]) / saved, tmp)


def _cpu_kernel_facts() -> dict:
    """What picks oneDNN / MKL kernels beyond torch's capability name: AVX-512 and AMX always report "AVX512",
    yet an AMX part and an older AVX-512 part block matmuls differently and round differently (a CI run on
    another part failed here bit for bit while matching to 1e-6)."""
    facts = {"model": "", "cache_size": "", "isa": []}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and not facts["model"]:
            facts["model"] = value
        elif key == "cache size" and not facts["cache_size"]:
            facts["cache_size"] = value
        elif key == "flags" and not facts["isa"]:
            facts["isa"] = sorted(f for f in value.split() if f.startswith(("avx512", "amx", "avx_vnni")))
    return facts


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), **_cpu_kernel_facts()}


def agreement(got: dict[str, list], want: dict[str, list]) -> float:
    """The median over tensors of the relative difference of their absolute sums: 2e-6 or less between an Intel
    Xeon (AVX-512, AMX) and an AMD EPYC (AVX2) on the same code; 4e-5 or more when the learning rate moves 5 %,
    4e-4 or more for another seed (measured). A median, as Adam's first steps move a weight with a near-zero
    gradient by about ``lr`` whichever way rounding tips it: a few LoRA-up tensors differ by 20 % between CPUs."""
    rel = sorted(abs(got[k][4] - want[k][4]) / max(want[k][4], 1e-30) for k in want if k != "__metadata__")
    return rel[len(rel) // 2] if rel else 0.0


AGREEMENT = 2e-5  # see agreement(): 10x the cross-CPU figure, half the smallest real change measured


def record() -> dict:
    result = {"machine": machine(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            result["cases"][name] = run_case(name, Path(tmp) / name)
            print(name, len(result["cases"][name]), "tensors", flush=True)
    return result


def main(argv: list[str]) -> None:
    runs = []
    this = record()
    if "--add" in argv:
        runs = [r for r in json.loads(GOLDEN.read_text(encoding="utf-8"))["runs"] if r["machine"] != this["machine"]]
        for run in runs:
            for name in NAMES:
                a = agreement(this["cases"][name], run["cases"][name])
                if a > AGREEMENT:
                    sys.exit(f"{name}: differs from the record of {run['machine']['model']} by {a:.2g} "
                             "(the code changed: rewrite the file without --add)")
    GOLDEN.write_text(json.dumps({"runs": [*runs, this]}, indent=0) + "\n", encoding="utf-8")
    print("wrote", GOLDEN, "with", len(runs) + 1, "machine kinds")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
