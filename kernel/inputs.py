"""## 7. Finding your text

Which files a run reads. `data.text_glob` (`**` recurses, each real folder walked once even through symlink
loops) names them, in file-name order; an empty glob means, on Kaggle, every readable file of the attached
datasets and competitions, and elsewhere (or with nothing attached) the demo corpus: the help topics that ship
inside every Python (`pydoc_data.topics`, ~465 KB of English), so the default run needs no download.

Never read, whatever the glob: a training run's output folder (an earlier version attached as an input), a
notebook's kept outputs, and a model's or tokenizer's folder. `.zip` and `.tar` archives are opened and their
members read by their own extensions. A dataset whose only readable text is its README beside files that
cannot be read is an error, not a corpus of one README.
"""

import collections
import fnmatch
import glob
import os
import tarfile
import zipfile
import zlib
from pathlib import Path

from kernel.env import RUN_OUTPUT_NAMES, KernelError, is_kaggle, kaggle_root
from kernel.sources import SUPPORTED, Source, file_format, is_archive

DEMO_CORPUS = "demo corpus: Python's built-in help topics (pydoc_data.topics)"


# --- The demo corpus and globs ----------------------------------------------------------------------------

def demo_sources() -> list[Source]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise KernelError("this Python has no pydoc_data module, which holds the demo corpus; set "
                          "data.text_glob to your own text files (e.g. data.text_glob='data/**/*.txt')") from None
    return [Source(f"pydoc_data.topics[{name!r}]", text=topics[name]) for name in sorted(topics)]


def describe_folder(root: Path, limit: int = 20) -> str:
    """A short listing of what is under `root`, for 'no file matched' errors."""
    if not root.exists():
        return f"{root} does not exist"
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            entries.append(str(Path(dirpath, name)))
            if len(entries) >= limit:
                return f"under {root}: " + ", ".join(entries) + ", ..."
    return f"under {root}: " + (", ".join(entries) if entries else "no files at all")


def glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    fixed = parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def unique_files(paths) -> list[Path]:
    """Existing files in name order, each real file once: a symlink loop under '**' (or a link beside its
    target) would otherwise read the same text many times, and copies would leak into validation."""
    seen, unique = set(), []
    for path in sorted(Path(p) for p in paths):
        if path.is_file() and (real := os.path.realpath(path)) not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def find_text_files(pattern: str) -> list[Path]:
    pattern = os.path.expanduser(pattern)
    if os.path.isfile(pattern):  # an existing path is taken literally, even with [ ] or * in its name
        return [Path(pattern)]
    paths = unique_files(recursive_matches(pattern) if "**" in pattern else glob.glob(pattern))
    if not paths:
        raise KernelError(f"data.text_glob={pattern!r} matches no file; {describe_folder(glob_root(pattern))}")
    return paths


def recursive_matches(pattern: str) -> list[str]:
    """The files a `**` pattern matches, as glob would find them (hidden names only where the pattern names
    them), walking each real folder once: glob itself follows every symlinked folder again, so two symlink
    loops make it expand without end."""
    root = glob_root(pattern)
    wanted = Path(pattern).parts[len(root.parts):]
    found, seen = [], {os.path.realpath(root)}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        kept = []
        for name in subfolders:
            real = os.path.realpath(os.path.join(folder, name))
            if real not in seen:
                seen.add(real)
                kept.append(name)
        subfolders[:] = kept
        relative = Path(folder).relative_to(root).parts
        found += [os.path.join(folder, name) for name in files if parts_match(wanted, (*relative, name))]
    return found


def parts_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """glob's rules for one path, part by part: `**` is any number of folders, a wildcard never matches a
    name that starts with a dot unless the pattern's part does."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        for skipped in range(len(parts) + 1):
            if parts_match(pattern[1:], parts[skipped:]):
                return True
            if skipped < len(parts) and parts[skipped].startswith("."):
                return False  # ** does not enter hidden folders
        return False
    hidden_ok = pattern[0].startswith(".") or not glob.has_magic(pattern[0])
    return (bool(parts) and (hidden_ok or not parts[0].startswith(".")) and fnmatch.fnmatchcase(parts[0], pattern[0])
            and parts_match(pattern[1:], parts[1:]))


# --- What is never text: run outputs, notebooks' outputs, models and tokenizers ------------------------

# Folders under /kaggle/input that hold other things than the user's text: earlier outputs of notebooks
# (checkpoints, samples) and model weights.
KAGGLE_NOT_TEXT = {"notebooks", "models", "kernels"}


# A folder holding two of these is a training run's output folder (this program's: an earlier version attached
# as an input, or the run's own): its samples, logs and scripts are never training text. Neither are the outputs
# Kaggle keeps of a notebook, nor a model's or a tokenizer's folder (a folder holding any of MODEL_FILES: its
# vocabulary, merges and model card would otherwise be read as text, or its JSON stop the run).
NOTEBOOK_OUTPUT_NAMES = {"__notebook__.ipynb", "__results__.html", "__output__.json"}
MODEL_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
               "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"}


def folder_not_text(folder: Path) -> str | None:
    """Why nothing under `folder` is training text, or None."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    if len(names & RUN_OUTPUT_NAMES) >= 2:
        return f"in a training run's output folder {folder}"
    if names & NOTEBOOK_OUTPUT_NAMES:
        return f"in a notebook's kept output folder {folder}"
    if found := sorted(names & MODEL_FILES):
        return f"in the model or tokenizer folder {folder} (it holds {', '.join(found)})"
    return None


def file_verdict(path: Path, given: bool, text_field: str, folders: dict, root: Path) -> Source | list[Source] | str:
    """A source for the file, or why it is skipped. `given`: the user's glob named it, so a file of unknown
    extension is read as text (code, extension-less files); in a search of attached inputs it is skipped.
    The folders looked at are those from the search's `root` down (a config.json above the data, in the
    project the glob is run from, says nothing about it)."""
    root = Path(os.path.abspath(root))
    root = root.parent if root.is_file() else root
    for folder in reversed(Path(os.path.abspath(path)).parents):  # outermost first: name the whole folder left out
        if folder != root and root not in folder.parents:
            continue
        if folder not in folders:
            folders[folder] = folder_not_text(folder)
        if folders[folder]:
            return folders[folder]
    if path.stat().st_size == 0:
        return "empty"
    if is_archive(path):
        return archive_sources(path, text_field)
    kind = file_format(path) or ("text" if given and path.suffix.lower() != ".gz" else None)
    if kind is None:
        return f"unsupported extension (read: {SUPPORTED})"
    source = Source(str(path), path=path, format=kind, text_field=text_field)
    return "binary (NUL bytes), not text" if source.looks_binary() else source


# --- Archives: their members, by their own extensions --------------------------------------------------

def archive_members(path: Path) -> list[tuple[str, int]]:
    """(name, uncompressed size) of each file in a .zip or .tar archive, in name order (folders, hidden files
    and macOS's __MACOSX metadata left out)."""
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            found = [(m.filename, m.file_size) for m in archive.infolist() if not m.is_dir()]
    else:
        with tarfile.open(path, "r:*") as archive:
            found = [(m.name, m.size) for m in archive.getmembers() if m.isfile()]
    return sorted((name, size) for name, size in found
                  if size and not any(part.startswith(".") or part == "__MACOSX" for part in Path(name).parts))


def archive_sources(path: Path, text_field: str) -> list[Source] | str:
    """A source for each readable member of an archive, by the member's own extension; or why none is."""
    try:
        members = archive_members(path)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as err:
        return f"a damaged archive ({type(err).__name__}: {err})"
    sources = [Source(f"{path}:{name}", path=path, format=kind, text_field=text_field, member=name, member_size=size)
               for name, size in members if (kind := file_format(Path(name)))]
    sources = [source for source in sources if not source.looks_binary()]
    return sources or f"an archive holding no readable file ({len(members)} member(s); read: {SUPPORTED})"


# --- The sources of a run ------------------------------------------------------------------------------

def kaggle_input_files() -> list[Path]:
    """Every file of the datasets and competitions attached to a Kaggle notebook, in both layouts:
    /kaggle/input/datasets/<owner>/<slug>/... (2026) and /kaggle/input/<slug>/... (older)."""
    root = kaggle_root() / "input"
    if not root.is_dir():
        return []
    found = []
    for top in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in KAGGLE_NOT_TEXT):
        found += recursive_matches(str(top / "**" / "*"))
    return unique_files(found)


def report_skipped(skipped: list[tuple[str, str]], limit: int = 5) -> str:
    """The skipped files by reason: 'empty: a.txt, b.txt; 57 files in the output folder X'."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(path)
    entries = []
    for reason, paths in by_reason.items():
        if reason.startswith("in "):  # a whole folder left out: its files need no listing
            entries.append(f"{len(paths)} file(s) {reason}")
        else:
            more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
            entries.append(f"{reason}: {', '.join(paths[:limit])}{more}")
    return "; ".join(entries)


DOCUMENTATION = {"readme", "license", "licence", "changelog", "citation", "notice"}  # file stems, any case


def is_documentation(source: Source) -> bool:
    return source.path is not None and not source.member and source.path.name.split(".")[0].lower() in DOCUMENTATION


def public_names(paths: list[Path], limit: int = 3) -> str:
    """The data as a model card may name it: Kaggle datasets by their slug (owner/slug), other files by their
    names; never a local folder (a home directory's path would be published with the model)."""
    root = kaggle_root() / "input"
    names = []
    for path in paths:
        parts = Path(os.path.abspath(path)).parts
        inside = parts[len(root.parts):] if parts[:len(root.parts)] == root.parts else ()
        if inside[:1] == ("datasets",) and len(inside) > 3:
            name = f"{inside[1]}/{inside[2]}"
        elif inside[:1] == ("competitions",) and len(inside) > 2:
            name = f"competition {inside[1]}"
        else:
            name = f"Kaggle dataset {inside[0]}" if len(inside) > 1 else path.name
        if name not in names:
            names.append(name)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def list_sources(text_glob: str, text_field: str = "") -> tuple[str, list[Source], list[tuple[str, str]]]:
    """(a description, the documents' sources, the files skipped with why). With no glob: on Kaggle every
    supported file of the attached inputs when there are any, else the demo corpus."""
    searching = not text_glob
    if searching and not is_kaggle():
        return DEMO_CORPUS, demo_sources(), []
    paths = kaggle_input_files() if searching else find_text_files(text_glob)
    root = kaggle_root() / "input" if searching else glob_root(os.path.expanduser(text_glob))
    sources, skipped, folders = [], [], {}
    for path in paths:
        verdict = file_verdict(path, not searching, text_field, folders, root)
        if isinstance(verdict, str):
            skipped.append((str(path), verdict))
        else:
            sources += verdict if isinstance(verdict, list) else [verdict]
    where = f"{kaggle_root() / 'input'}" if searching else repr(text_glob)
    if skipped:
        print(f"[data] skipped {len(skipped)} file(s) under {where}: {report_skipped(skipped)}")
    unusable = [(p, r) for p, r in skipped if not r.startswith("in ")]  # not left out by a folder rule
    if sources and unusable and all(is_documentation(s) for s in sources):
        raise KernelError(f"the only readable text under {where} is {public_names([s.path for s in sources])}, a "
                          f"dataset's documentation; its data files cannot be read: {report_skipped(unusable)}. "
                          "Convert them to a format this reads, or name the documentation in data.text_glob to "
                          "train on it")
    if sources:
        counts = collections.Counter(s.format for s in sources)
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        if searching:
            print(f"[data] data.text_glob is empty: using the attached inputs' files ({kinds})")
        return f"{len(sources)} file(s) ({kinds}): {public_names([s.path for s in sources])}", sources, skipped
    if searching and not unusable:
        print(f"[data] no text file under {where}: training on the demo corpus (attach a dataset, or set DATA_GLOB)")
        return DEMO_CORPUS, demo_sources(), skipped
    raise KernelError(f"no usable text under {where}: {report_skipped(skipped)}")
