"""bench_step's report: the tables it prints from the measurements (step_measure.py) it ran."""
from __future__ import annotations

from typing import Any

from _common import table


def step_rows(results: list[dict[str, Any]], rss: list[dict[str, Any]]) -> list[list[str]]:
    """One row per setting: CPU and wall ms per step, the HF/vlkit ratios, FLOPs, FLOP rate, peak RSS."""
    rss_of = {(r["impl"], r["setting"]): (r["peak_rss_mb"], r["step_peak_over_build_mb"]) for r in rss}
    rows = []
    for res in results:
        v, h = res["impl"]["vlkit"], res["impl"]["hf_llava"]
        key_v, key_h = ("vlkit", res["setting"]), ("hf_llava", res["setting"])
        mem = (f"{rss_of[key_v][0]:.0f} / {rss_of[key_h][0]:.0f} (+{rss_of[key_v][1]:.0f} / +{rss_of[key_h][1]:.0f})"
               if key_v in rss_of else "-")
        rows.append([res["setting"], f"{res['trainable_params']:,}",
                     f"{v['median_step_cpu_s'] * 1e3:.0f} / {h['median_step_cpu_s'] * 1e3:.0f}",
                     f"**{res['ratio_hf_over_vlkit_cpu']:.2f}x**",
                     f"{v['median_step_wall_s'] * 1e3:.0f} / {h['median_step_wall_s'] * 1e3:.0f}",
                     f"{res['ratio_hf_over_vlkit_wall']:.2f}x",
                     f"{v['flops_fwd_bwd'] / 1e9:.1f} / {h['flops_fwd_bwd'] / 1e9:.1f}",
                     f"{v['gflops_per_cpu_s']:.0f} ({v['share_of_matmul_rate_cpu']:.0%}) / "
                     f"{h['gflops_per_cpu_s']:.0f} ({h['share_of_matmul_rate_cpu']:.0%})", mem])
    return rows


def print_pipeline(p: dict[str, Any], batch: int) -> None:
    """The data pipeline's overhead and the padding fraction with and without group_by_length."""
    print()
    print(table(["data pipeline (toy instruct data, vlkit instruct step)", "CPU", "wall"], [
        ["load PNGs + transform + collate, per batch", f"{p['cpu']['load_collate_s'] * 1e3:.1f} ms",
         f"{p['wall']['load_collate_s'] * 1e3:.1f} ms"],
        ["step on pre-collated tensors", f"{p['cpu']['step_precollated_s'] * 1e3:.0f} ms",
         f"{p['wall']['step_precollated_s'] * 1e3:.0f} ms"],
        ["step including loading", f"{p['cpu']['step_full_s'] * 1e3:.0f} ms",
         f"{p['wall']['step_full_s'] * 1e3:.0f} ms"],
        ["overhead = load / step", f"**{p['overhead_load_over_step_cpu']:.1%}**",
         f"{p['overhead_load_over_step_wall']:.1%}"],
        ["overhead = full / pre-collated - 1 (noisier)", f"{p['overhead_full_vs_precollated_cpu']:+.1%}",
         f"{p['overhead_full_vs_precollated_wall']:+.1%}"],
    ]))
    print()
    print(table(["padding fraction (toy instruct, mean of 5 epochs)", "group_by_length", "random batches"],
                [[f"batch {bs}", f"{p['padding_fraction'][f'batch{bs}_grouped']:.1%}",
                  f"{p['padding_fraction'][f'batch{bs}_random']:.1%}"] for bs in sorted({batch, 32})]))


def print_report(payload: dict[str, Any], batch: int) -> None:
    facts, peak = payload["batch"], payload["matmul_2048_fp32_gflops"]
    print()
    print(f"batch {facts['samples']} x {facts['padded_length']} padded ({facts['real_tokens']} real tokens, "
          f"{facts['image_tokens']} image tokens, {facts['supervised_tokens']} supervised); torch threads "
          f"{payload['env']['torch_threads']}; fp32 matmul 2048^2: {peak['per_cpu_s']:.0f} GFLOP/s per CPU-second "
          f"({peak['per_wall_s']:.0f} per wall-second)")
    print(table(["setting", "trainable", "CPU ms/step vlkit / HF", "HF/vlkit (CPU)", "wall ms/step vlkit / HF",
                 "HF/vlkit (wall)", "GFLOP/step vlkit / HF", "GFLOP/s vlkit / HF (% of matmul)",
                 "peak RSS MiB vlkit / HF (+ over built model)"], step_rows(payload["settings"], payload["peak_rss"])))
    if payload["data_pipeline"]:
        print_pipeline(payload["data_pipeline"], batch)
