"""What OUT holds: whether a run wrote there, the user's own files, and removing only prep's."""

from __future__ import annotations

from prep.schemas import contract


def output_exists(out: str) -> bool:
    """Whether OUT holds anything a run writes (contract.OUTPUT_ENTRIES)."""
    from apache_beam.io.filesystems import FileSystems

    return any(FileSystems.exists(f"{out.rstrip('/')}/{name}") for name in contract.OUTPUT_ENTRIES)


def files_under(out: str) -> list[str]:
    """Every file under OUT, as '/'-separated paths relative to it ([] when OUT does not exist)."""
    from apache_beam.io.filesystems import FileSystems

    base = out.rstrip("/")
    (result,) = FileSystems.match([f"{base}/**"])  # nothing matches where OUT does not exist
    return sorted(m.path[len(base) + 1:] for m in result.metadata_list if m.path.startswith(base + "/"))


def foreign_files(out: str) -> list[str]:
    """The files under OUT that prep does not write (contract.is_run_file): the user's; []
    as soon as OUT holds any file of prep's (then it is a prep output, complete or partial)."""
    files = files_under(out)
    if any(contract.is_run_file(rel) for rel in files):
        return []
    return files


def clear_output(out: str) -> None:
    """Remove every file a run writes under OUT, its bookkeeping included (contract.is_run_file),
    and prep's folders left empty; any other file (the user's) stays where it is."""
    import os
    import shutil

    from apache_beam.io.filesystems import FileSystems

    from prep.schemas.card import is_prep_card

    base = out.rstrip("/")
    mine = [f"{base}/{rel}" for rel in files_under(base) if contract.is_run_file(rel)]
    card = f"{base}/{contract.DATASET_CARD}"
    if FileSystems.exists(card) and is_prep_card(card):
        mine.append(card)
    if mine:
        FileSystems.delete(mine)
    if FileSystems.get_scheme(base) is None:  # local folders: remove prep's own once empty
        folders = {contract.shard_folder(s, d) for s, d in contract.split_domains()}
        folders |= {contract.DEAD_LETTER_DIR, contract.PLAN_DIR, *contract.SPLITS[1:]}
        for rel in sorted(folders, key=lambda f: -f.count("/")):
            path = os.path.join(base, rel)
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        chunks = os.path.join(base, contract.CHUNKS_DIR)  # only prep's files ever go there
        if os.path.isdir(chunks):
            shutil.rmtree(chunks)
