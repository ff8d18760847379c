# Sourced by the prepared GPU scripts: the carried wheels a GPU image lacks, and this tree on the path.
# The H200 image has torch, accelerate, peft, safetensors and the rest, but not diffusers: carry its wheels in
# .whl/ (pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata); they install beside the tree.
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
