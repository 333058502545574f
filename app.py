"""Magic 1-For-1 web demo: `python app.py [--preset P] [--host H] [--port N]`."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv=None) -> None:
    from magic_demo.presets import ASSETS, DEFAULT_PRESET, PRESETS
    from magic_demo.service import DemoService
    from magic_demo.ui import build_app

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument("--quantize", default="int8", choices=["int8", "none"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer (faster windows; the first one compiles, ~30 s on CPU)")
    # Local runs bind to loopback only; on Hugging Face Spaces (SPACE_ID set) the container must listen on all.
    default_host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    parser.add_argument("--host", default=default_host, help="bind address (0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--outputs", default="outputs", help="folder for videos (old files are cleaned)")
    parser.add_argument("--queue-size", type=int, default=16, help="waiting jobs before new ones are refused")
    parser.add_argument("--concurrency", type=int, default=1, help="generations at once per model")
    args = parser.parse_args(argv)

    service = DemoService(args.preset, quantize=args.quantize, outputs_dir=args.outputs, compile=args.compile)
    service.warm_up()
    demo = build_app(service)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(service.outputs_dir), str(ASSETS)],
                max_file_size="20mb", footer_links=["api"], show_error=True)


if __name__ == "__main__":
    main()
