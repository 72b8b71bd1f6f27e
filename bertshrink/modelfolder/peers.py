"""Finding peer tools' model folders (benchmarks/peers.py writes them through ``compression.peers``).

``current_peers`` keeps only the peers made from the teacher that is there now: a peer of an
earlier teacher would not be a like-for-like comparison.
"""

from __future__ import annotations

from pathlib import Path

from bertshrink.modelfolder.files import CONFIG_FILE
from bertshrink.modelfolder.meta import meta_path, read_meta
from bertshrink.modelfolder.size import content_fingerprint

PEER_KIND = "peer"


def peer_folders(root: Path) -> list[Path]:
    """Folders under ``root`` whose metadata says they are peers, by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and (d / CONFIG_FILE).is_file() and meta_path(d).is_file() and read_meta(d).kind == PEER_KIND]


def current_peers(root: Path, teacher_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """(peer folders made from ``teacher_dir`` as it is now, {name: why skipped} for the others)."""
    folders = peer_folders(root)
    if not folders:
        return [], {}
    teacher = content_fingerprint(teacher_dir)
    current, skipped = [], {}
    for folder in folders:
        if (read_meta(folder).peer or {}).get("teacher_fingerprint") == teacher:
            current.append(folder)
        else:
            skipped[folder.name] = f"made from another teacher than {teacher_dir}: run benchmarks/peers.py again"
    return current, skipped
