"""A qwen-vl-utils video reader backed by PyAV, for machines without decord.

Same contract and sampling as qwen-vl-utils' decord reader (`_read_video_decord`): container
frame count and average rate, `smart_nframes`, `linspace(...).round()` indices, uint8 TCHW frames.
PyAV and decord decode identical frames through ffmpeg (tests/test_preprocess.py checks it where
decord is installed).
"""

from __future__ import annotations

from typing import Any


def read_video_pyav(ele: dict[str, Any]) -> tuple[Any, dict[str, Any], float]:
    """(frames uint8 [T, C, H, W], metadata, sample_fps) for a qwen-vl-utils video element."""
    import av
    import numpy as np
    import torch
    from qwen_vl_utils.vision_process import smart_nframes

    path = ele["video"]
    path = path[7:] if path.startswith("file://") else path
    with av.open(path) as container:
        stream = container.streams.video[0]
        total, fps = stream.frames, float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    total = total or len(frames)
    nframes = smart_nframes(ele, total_frames=total, video_fps=fps)
    idx = torch.linspace(0, total - 1, nframes).round().long().tolist()
    video = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2)
    meta = {"fps": fps, "frames_indices": idx, "total_num_frames": total, "video_backend": "pyav"}
    return video, meta, nframes / max(total, 1e-6) * fps
