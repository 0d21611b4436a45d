"""bench/ceiling.py runs end to end: its variants in fresh processes, rounds interleaved, one
record per (stage, size, pool) with medians and ranges that belong together."""

from __future__ import annotations


def test_ceiling_runs_every_variant_and_reports_consistent_medians(tmp_path):
    from bench.ceiling import main

    records = main(["--stages", "mask", "--sizes", "celeba", "--images", "24", "--rounds", "2",
                    "--threads", "2", "--work", str(tmp_path)])
    assert [(r["stage"], r["size"], r["pool"]) for r in records] == [("mask", "celeba", False), ("mask", "celeba", True)]
    serial, pooled = records
    for r in records:
        assert r["rounds"] == 2 and r["images"] == 24
        assert r["plain_range"][0] <= r["plain_ips"] <= r["plain_range"][1]
        assert r["stage_range"][0] <= r["stage_ips"] <= r["stage_range"][1]
        assert r["plumbing_ips"] > 0 and abs(r["ratio"] - r["stage_ips"] / r["plain_ips"]) < 0.01
    assert serial["plain_ips"] == pooled["plain_ips"] and serial["threads"] == 1 and pooled["threads"] == 2
    assert pooled["pool_speedup"] == round(pooled["stage_ips"] / serial["stage_ips"], 2)


def test_ceiling_runs_a_chat_family_caption_stage(tmp_path):
    """--caption-family qwen2_vl: the chat processor per image (with the template's text), collated
    by the stage; every image comes through the stage and the plain loop (measure() raises
    otherwise) and the records say which family they measured."""
    from bench.ceiling import main

    records = main(["--stages", "caption", "--sizes", "celeba", "--images", "16", "--rounds", "1",
                    "--threads", "2", "--caption-family", "qwen2_vl", "--work", str(tmp_path)])
    assert [(r["stage"], r["family"], r["pool"]) for r in records] == [("caption", "qwen2_vl", False),
                                                                       ("caption", "qwen2_vl", True)]
    assert all(r["images"] == 16 and r["plain_ips"] > 0 and r["stage_ips"] > 0 for r in records)
    assert (tmp_path / "qwen2_vl-processor" / "processor_config.json").is_file()
