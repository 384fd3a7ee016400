"""Stage 6 (beside `serve/`), what a format or speed lever costs in picture: `liveavatar-lite eval`.

Owns: the settings syntax `PATH[:key=value,...]` (`settings.py`), the picture metrics (latent
relative L2, PSNR, SSIM, flicker, the lip-sync proxy, drift; `metrics.py`), the rendering of one
input under several settings, one loaded at a time, and their comparison clip by clip (`run.py`),
the table and JSON (`report.py`) and the pictures: contact sheet, drift plot, side-by-side mp4
(`visuals.py`). docs/eval.md says how to read the numbers.

May import: `pipeline/` and every stage below it; never `serve/` or `farm/` (same rank or above).
"""
