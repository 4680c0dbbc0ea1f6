"""The peer of the side-by-side runner: the add model served the way a user would by hand,
with FastAPI and uvicorn (one worker), in the same request/response format as modelgate."""

import importlib.util
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

KEY = os.environ.get("ACCESS_KEY", "bench-add-key-0123456789abcdef")
_spec = importlib.util.spec_from_file_location(
    "add_numbers", os.path.join(os.environ["MODEL_DIR"], "add_numbers.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
add = _module.add

app = FastAPI()


@app.post("/model")
async def model(request: Request):
    body = await request.json()
    if body.get("accessKey") != KEY:
        return JSONResponse({"success": False, "error": {"code": "access_key.invalid",
                                                         "message": "unknown access key"}}, 401)
    return {"success": True, "response": add(body["request"]), "replicaId": "fastapi-0"}
