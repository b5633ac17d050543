"""The image builder: recipes (recipe.py, pure), the stage plan (stages.py, pure), safe chroot
administration (chroot.py), generations (generations.py), TFTP publishing and the generated
images file (publish.py), the executor (build.py) and the ``sidus-image`` CLI (__main__.py).
See docs/images.md."""
