"""Builds template.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so `dvc plots show` and
`dvc plots diff` render without network (DVC's own page loads them from a CDN: blank offline). The versions are
the ones DVC's renderer asks the CDN for (dvc_render/vega.py), from the npm registry; their licences are kept
beside the template. .dvc/config points DVC at it (`plots.html_template`, relative to .dvc/).

    cd "$(mktemp -d)" && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 && \
        python <repo>/.dvc/offline_plots/build.py "$PWD"

The template has no `{scripts}` placeholder, so DVC adds no CDN <script> tags; it keeps `{plot_divs}`.
"""

import sys
import tarfile
from pathlib import Path

PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
HERE = Path(__file__).resolve().parent
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- inlined for offline use: {versions}; licences in .dvc/offline_plots/ -->
{inlined}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def member(tgz: Path, name: str) -> str:
    with tarfile.open(tgz) as archive:
        return archive.extractfile(f"package/{name}").read().decode("utf8")


def main(folder: str) -> None:
    scripts = []
    for package, version in PACKAGES.items():
        tgz = Path(folder) / f"{package}-{version}.tgz"
        code = member(tgz, f"build/{package}.min.js").replace("</script", "<\\/script")
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
            assert placeholder not in code, f"{tgz.name} holds {placeholder}: DVC would fill it in"
        scripts.append(f'    <script type="text/javascript">\n{code}\n    </script>')
        (HERE / f"LICENSE.{package}").write_text(member(tgz, "LICENSE"))
    versions = ", ".join(f"{p}@{v}" for p, v in PACKAGES.items())
    html = PAGE.format(refresh_tag="{refresh_tag}", versions=versions, inlined="\n".join(scripts),
                       plot_divs="{plot_divs}")
    (HERE / "template.html").write_text(html)


if __name__ == "__main__":
    main(sys.argv[1])
