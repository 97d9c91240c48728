"""Print the README's memory-plan table: the LLaMA paper sizes x our profiles (`auto` choice)."""

from llamaexport import LlamaExportError
from llamaexport.build.planner import GiB, choose
from llamaexport.build.profiles import load_profile
from llamaexport.build.recipe import Recipe
from llamaexport.model.config import config_for_size

SIZES = ["7B", "13B", "33B", "65B", "llama2-70B", "llama3-8B", "llama3.2-3B"]
PROFILES = ["rtx4090", "rtx3090", "jetson-orin-agx-64gb", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb",
            "jetson-thor", "cpu"]


def cell(size, prof):
    cfg = config_for_size(size)
    p = load_profile(prof)
    ctx = min(cfg.max_seq_len, p.default_context)
    try:
        c = choose(cfg, p, Recipe.candidates(p), context=ctx)
        return f"{c.label} {c.total / GiB:.1f} GiB, {c.decode_ceiling:.0f} tok/s"
    except LlamaExportError:
        return "does not fit"


if __name__ == "__main__":
    print("| size | " + " | ".join(PROFILES) + " |")
    print("|---" * (len(PROFILES) + 1) + "|")
    for s in SIZES:
        print(f"| {s} | " + " | ".join(cell(s, p) for p in PROFILES) + " |")
