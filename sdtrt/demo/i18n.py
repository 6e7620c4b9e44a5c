"""The demo's two languages: every visible string, and the example prompts, by key.

Chinese is the default for a Taiyi model (its text encoder reads Chinese); English otherwise. The
switch changes labels, hints, buttons and the examples; prompts already typed stay as they are.
"""

from __future__ import annotations

LANGUAGES = ("zh", "en")
CHOICES = [("中文", "zh"), ("English", "en")]  # (shown, value) for the switch

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "## sdtrt — Stable Diffusion",
        "model": "Model: `{name}` ({family}, native size {width}x{height}, {backend}). Requests wait their turn in a queue.",
        "clip_hint": "",
        "language": "Language / 语言",
        "tab_txt2img": "Text to image",
        "tab_img2img": "Image to image",
        "tab_inpaint": "Inpainting",
        "prompt": "Prompt",
        "prompt_placeholder": "What to draw, e.g. a watercolor fox in the snow",
        "negative_prompt": "Negative prompt",
        "negative_placeholder": "What to avoid, e.g. blurry, low quality",
        "sampler": "Sampler",
        "steps": "Sampling steps",
        "cfg": "CFG scale",
        "cfg_info": "how closely to follow the prompt (1 or less: guidance off)",
        "seed": "Seed",
        "seed_info": "-1: a new random seed each time",
        "random_seed": "🎲",
        "reuse_seed": "♻️",
        "width": "Width",
        "height": "Height",
        "images": "Images per prompt",
        "strength": "Denoising strength",
        "strength_info": "low keeps the picture, 1 repaints it fully",
        "init_image": "Initial image",
        "inpaint_editor": "Image — paint over the area to repaint",
        "mask_upload": "Or upload a mask (white repaints)",
        "mask_accordion": "Mask from a file",
        "generate": "Generate",
        "stop": "Stop",
        "stopped": "Stopped after step {done} of {total}.",
        "gallery": "Images",
        "files": "PNG files (with the generation parameters)",
        "info": "Generation info",
        "examples": "Examples",
        "no_encoder": "This export has no VAE encoder, which image to image and inpainting need: re-export with "
                      "`--components text_encoder,unet,vae_decoder,vae_encoder`.",
        "err_no_image": "Upload an initial image first.",
        "err_no_mask": "Paint the area to repaint over the image (brush), or upload a mask.",
        "err_internal": "Internal error ({what}); the details are in the server's log.",
        "try": "Try",
        "done": "seed {seed}; {seconds:.2f} s",
        "progress_text": "encoding the prompt",
        "progress_denoise": "denoising",
        "progress_decode": "decoding",
    },
    "zh": {
        "title": "## sdtrt — Stable Diffusion 文生图",
        "model": "模型：`{name}`（{family}，原生尺寸 {width}x{height}，{backend}）。请求按队列依次处理。",
        "clip_hint": "提示：此模型的文本编码器是英文 CLIP，英文提示词效果更好；中文提示词请用太乙（Taiyi）模型。",
        "language": "语言 / Language",
        "tab_txt2img": "文生图",
        "tab_img2img": "图生图",
        "tab_inpaint": "局部重绘",
        "prompt": "提示词",
        "prompt_placeholder": "想画什么，例如：飞流直下三千尺，油画",
        "negative_prompt": "反向提示词",
        "negative_placeholder": "不想要什么，例如：模糊，低质量",
        "sampler": "采样方法",
        "steps": "采样步数",
        "cfg": "提示词相关性（CFG）",
        "cfg_info": "越高越贴近提示词（小于等于 1 时关闭引导）",
        "seed": "随机种子",
        "seed_info": "-1：每次随机",
        "random_seed": "🎲",
        "reuse_seed": "♻️",
        "width": "宽度",
        "height": "高度",
        "images": "每个提示词生成张数",
        "strength": "重绘幅度",
        "strength_info": "越低越接近原图，1 为完全重绘",
        "init_image": "原图",
        "inpaint_editor": "原图——用画笔涂抹要重绘的区域",
        "mask_upload": "或上传蒙版（白色区域重绘）",
        "mask_accordion": "从文件读取蒙版",
        "generate": "生成",
        "stop": "停止",
        "stopped": "已在第 {done} 步（共 {total} 步）停止。",
        "gallery": "图片",
        "files": "PNG 文件（含生成参数）",
        "info": "生成信息",
        "examples": "示例",
        "no_encoder": "此导出没有 VAE 编码器，图生图和局部重绘需要它：请用 "
                      "`--components text_encoder,unet,vae_decoder,vae_encoder` 重新导出。",
        "err_no_image": "请先上传原图。",
        "err_no_mask": "请用画笔在图上涂抹要重绘的区域，或上传蒙版。",
        "err_internal": "内部错误（{what}），详情见服务器日志。",
        "try": "可改为",
        "done": "种子 {seed}；{seconds:.2f} 秒",
        "progress_text": "编码提示词",
        "progress_denoise": "去噪",
        "progress_decode": "解码",
    },
}

# The request parameters' names in the UI, for errors that name a parameter (sdtrt's InvalidRequest).
PARAMS = {
    "en": {"prompt": "Prompt", "negative_prompt": "Negative prompt", "scheduler": "Sampler", "steps": "Sampling steps",
           "guidance_scale": "CFG scale", "seed": "Seed", "width": "Width", "height": "Height",
           "num_images_per_prompt": "Images per prompt", "strength": "Denoising strength", "image": "Initial image",
           "mask_image": "Mask"},
    "zh": {"prompt": "提示词", "negative_prompt": "反向提示词", "scheduler": "采样方法", "steps": "采样步数",
           "guidance_scale": "提示词相关性（CFG）", "seed": "随机种子", "width": "宽度", "height": "高度",
           "num_images_per_prompt": "每个提示词生成张数", "strength": "重绘幅度", "image": "原图", "mask_image": "蒙版"},
}

# (prompt, negative prompt). The Chinese ones are in the style of Taiyi's own examples.
EXAMPLES = {
    "en": [
        ("a watercolor fox in a snowy forest, soft light", "blurry, low quality"),
        ("a lighthouse on a cliff at sunset, oil painting", "blurry, low quality"),
        ("a cyberpunk city street at night, neon lights, rain", "blurry, low quality"),
        ("a cup of green tea on a wooden table, photograph", "blurry, low quality"),
    ],
    "zh": [
        ("飞流直下三千尺，油画", "广告，模糊，低质量"),
        ("铁马冰河入梦来，概念画，科幻，玄幻，3D", "广告，模糊，低质量"),
        ("江南水乡，烟雨朦胧，水墨画", "广告，模糊，低质量"),
        ("一只穿着宇航服的柴犬，赛博朋克风格，高清", "广告，模糊，低质量"),
    ],
}


def default_language(family: str) -> str:
    """Chinese for a Taiyi model (its text encoder reads Chinese), English for the rest."""
    return "zh" if family == "taiyi" else "en"


def text(lang: str, key: str, **values) -> str:
    s = TEXT[lang][key]
    return s.format(**values) if values else s


def param(lang: str, name: str) -> str:
    return PARAMS[lang].get(name, name)
