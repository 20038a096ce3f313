"""configs/ and recipes/ ship inside the wheel and are found by a non-editable install."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_composes_from_an_install(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("alignkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("configs", "recipes"):
        shipped = {Path(n).relative_to(f"alignkit/{folder}").as_posix() for n in names
                   if n.startswith(f"alignkit/{folder}/") and n.endswith(".yaml")}
        in_repo = {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.yaml")}
        assert shipped == in_repo
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # run from the extracted wheel only (no checkout on the path), as an installed package would
    code = ("import alignkit, sys; from alignkit.methods import compose; "
            "cfg = compose(['method=dpo', 'adapter=qlora']); "
            "from alignkit.recipe.plan import plan_recipe; _, stages = plan_recipe('rlhf', ['model=tiny']); "
            "assert [s.name for s in stages] == ['sft', 'rm', 'ppo']; "
            "assert alignkit.__file__.startswith(sys.argv[1]), alignkit.__file__; "
            "import alignkit.export.run, alignkit.export.gguf, alignkit.runs.read; print(cfg.method.beta)")
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}",
                           str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.1"
