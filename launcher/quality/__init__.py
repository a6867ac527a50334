"""`magcache-launch compare A B`: how far a cached video is from its reference, in numbers.

    frames.py    an .mp4, a folder of PNG frames or a --save-latents file -> Frames (numpy)
    metrics.py   PSNR, SSIM (luma is the headline, RGB beside it), temporal flicker; latents
                 MSE / PSNR / cosine. Pure numpy float64, so the numbers can be checked by hand
    lpips.py     LPIPS (AlexNet, v0.1) in plain torch, from weight files the user supplies
                 (lpips_files.py names them, torch-free, for the "skipped" note)
    table.py     the console table and the headline; plot.py the per-frame PNG
    compare.py   the command: load, check, measure, print

Siblings of `engine/`: nothing here loads a model or a checkpoint, and nothing runs Wan.
"""
