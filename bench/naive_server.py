"""The naive classification server dicebox's is measured against: the original dicebox shape.

The original classification service was a Flask app run by Flask's own development server
(``app.run(threaded=True)``: one thread per connection), which per request decoded the
base64 image with PIL, resized it and called the framework model's forward. This peer does
the same with PyTorch: the same trained weights (``dicebox.Model.to_torch()``, whose
softmax equals ``Model.predict``), PIL decode + convert + resize, a float tensor, one
forward under ``torch.inference_mode()``, softmax, top-k, a JSON answer. It takes and answers
the same bodies as ``POST /v1/models/{id}/classify`` (JSON ``{"items": [{"data": base64}]}``
-> ``{"predictions": [{"category", "probability", "top": [...]}]}``), so a load generator
sends both the same requests.

Werkzeug's per-request access log is turned off (dicebox's benchmark server runs without an
access log too), which only makes the peer faster than the original.

    .venv/bin/python bench/naive_server.py --model MODEL_DIR --port 8081 [--threads N]
"""

from __future__ import annotations

import argparse
import base64
import io
import logging

import numpy as np
import torch
from flask import Flask, jsonify, request
from PIL import Image

import dicebox


def make_app(model_dir: str) -> Flask:
    model = dicebox.Model.load(model_dir)
    module = model.to_torch().eval()
    channels, height, width = model.input_shape
    categories = model.categories
    mode = "L" if channels == 1 else "RGB"
    app = Flask("naive-classifier")

    @app.route("/classify", methods=["POST"])
    def classify():
        body = request.get_json()
        predictions = []
        for item in body["items"]:
            image = Image.open(io.BytesIO(base64.b64decode(item["data"]))).convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
            pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
            x = torch.from_numpy(np.ascontiguousarray(pixels)).float().unsqueeze(0)
            with torch.inference_mode():
                probabilities = torch.softmax(module(x), dim=1)[0]
            values, indices = torch.topk(probabilities, min(5, len(categories)))
            top = [{"category": categories[i], "probability": float(p)}
                   for p, i in zip(values.tolist(), indices.tolist())]
            predictions.append({"category": top[0]["category"],
                                "probability": top[0]["probability"], "top": top})
        return jsonify({"predictions": predictions})

    @app.route("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory (dicebox.Model.save)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: PyTorch's own, one per core)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    make_app(args.model).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
