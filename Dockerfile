# Custom Beam SDK container for Dataflow workers (GPU): the Beam Python 3.11 SDK image with
# the project, CUDA torch and onnxruntime-gpu installed. Build and push:
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/prep:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/prep:0.1.0
# Optionally bake weights in so workers do not download them at start:
#   docker build --build-arg BAKE_MODELS=paper ...
FROM apache/beam_python3.11_sdk:2.77.0

ARG BAKE_MODELS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/models/huggingface \
    REMBG_HOME=/opt/models/rembg \
    PREP_CACHE=/opt/models/prep

WORKDIR /opt/prep
# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY __init__.py cli.py demo.py atomic.py device.py faults.py ./
COPY schemas/ schemas/
COPY transforms/ transforms/
COPY pipeline/ pipeline/
COPY models/ models/
COPY trainer/ trainer/
COPY report/ report/
# The same install the README uses; then rembg's CPU onnxruntime is swapped for the GPU build
# (both provide the `onnxruntime` module, so only one may be installed). Last, rembg's first
# import compiles pymatting's numba functions (~45 s on 2 cores) and caches them beside the
# package: once here, not once per worker process on every new VM.
RUN pip install --no-cache-dir . \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir 'onnxruntime-gpu>=1.20,<2' \
    && pip check \
    && python -c "import rembg"

RUN if [ -n "$BAKE_MODELS" ]; then python -m prep.pipeline.bake "$BAKE_MODELS"; fi

# The Beam SDK harness entrypoint comes from the base image.
ENTRYPOINT ["/opt/apache/beam/boot"]
