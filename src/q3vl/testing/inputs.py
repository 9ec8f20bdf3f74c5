"""The built-in parity input set: generated offline, no downloads, torch-free.

Short and long text, text in 12 scripts, images of several sizes and aspect ratios (one below
min_pixels, one screenshot-like 1920x1080 that max_pixels shrinks), a video file (H.264, written
with PyAV), a frame list, and mixed items.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

MULTILINGUAL = {
    "english": "The quick brown fox jumps over the lazy dog near the riverbank.",
    "chinese": "敏捷的棕色狐狸跳过了河岸边的懒狗。",
    "japanese": "素早い茶色の狐が川岸の怠け者の犬を飛び越える。",
    "korean": "빠른 갈색 여우가 강둑 근처의 게으른 개를 뛰어넘는다.",
    "arabic": "الثعلب البني السريع يقفز فوق الكلب الكسول بالقرب من ضفة النهر.",
    "hindi": "तेज़ भूरी लोमड़ी नदी के किनारे आलसी कुत्ते के ऊपर कूदती है।",
    "russian": "Быстрая бурая лиса прыгает через ленивую собаку у берега реки.",
    "greek": "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο κοντά στην όχθη.",
    "hebrew": "השועל החום המהיר קופץ מעל הכלב העצלן ליד גדת הנהר.",
    "thai": "สุนัขจิ้งจอกสีน้ำตาลกระโดดข้ามสุนัขขี้เกียจใกล้ริมฝั่งแม่น้ำ",
    "tamil": "வேகமான பழுப்பு நரி ஆற்றங்கரை அருகே சோம்பேறி நாயின் மேல் குதிக்கிறது.",
    "emoji+code": "Deploy 🚀 with `pip install q3vl` — ✅ parity, ⚡ speed; x² + y² = r²",
}


def gradient_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: structure at every scale, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx * 3 + yy * 2 + seed * 40) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8))


def screenshot_image(h: int = 1080, w: int = 1920) -> Image.Image:
    """A UI-like image: title bar, sidebar, text lines and buttons on a light background."""
    img = Image.new("RGB", (w, h), (245, 246, 248))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 60], fill=(40, 44, 52))
    d.rectangle([0, 60, 280, h], fill=(230, 232, 236))
    for i in range(24):
        y = 100 + i * 38
        d.text((320, y), f"Row {i}: retrieval latency {i * 3 + 7} ms, recall@10 0.9{i % 10}", fill=(20, 20, 20))
        d.text((20, y), f"Menu item {i}", fill=(60, 60, 60))
    for i in range(4):
        d.rounded_rectangle([w - 220, 100 + i * 70, w - 40, 150 + i * 70], radius=8, fill=(37, 99, 235))
    return img


def write_video(path: Path, frames: int = 24, width: int = 320, height: int = 240, fps: int = 8) -> Path:
    """An H.264 clip with moving content."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            arr = np.asarray(gradient_image(height, width, seed=i)).copy()
            arr[40:100, (i * 9) % (width - 60):(i * 9) % (width - 60) + 60] = (250, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def default_inputs(workdir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, item) pairs for `q3vl parity`; media files are written under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    video = write_video(workdir / "parity-clip.mp4")
    frames = [gradient_image(120, 160, seed=50 + i) for i in range(6)]
    items: list[tuple[str, dict[str, Any]]] = [
        ("text/short", {"text": "hello"}),
        ("text/long", {"text": " ".join(MULTILINGUAL["english"] for _ in range(40))}),
        ("text/empty-string", {"text": ""}),
        ("text/instruction", {"text": "cats", "instruction": "Retrieve images of the animal"}),
    ]
    items += [(f"text/{lang}", {"text": t}) for lang, t in MULTILINGUAL.items()]
    for h, w in [(224, 224), (480, 640), (1200, 300), (200, 1280), (20, 20)]:
        items.append((f"image/{w}x{h}", {"image": gradient_image(h, w, seed=h + w)}))
    items += [
        ("image/screenshot-1920x1080", {"image": screenshot_image()}),
        ("video/file", {"video": str(video)}),
        ("video/frame-list", {"video": frames}),
        ("mixed/text+image", {"text": "a gradient", "image": gradient_image(256, 384, seed=7)}),
        ("mixed/text+video", {"text": "a red box moving", "video": str(video), "fps": 2}),
        ("mixed/2 images+texts", {"text": ["left", "right"], "image": [gradient_image(96, 96, 1),
                                                                    gradient_image(160, 96, 2)]}),
        ("null", {}),
    ]
    return items
