# grayproxy in a container.
#
#   docker build -t grayproxy .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/grayproxy.yaml:/etc/grayproxy/grayproxy.yaml:ro" grayproxy
#
# The config is read from /etc/grayproxy/grayproxy.yaml: mount yours there (a file or the
# whole directory). Inside a container the data plane must listen on 0.0.0.0 (listen:
# "0.0.0.0:8080") to be reachable through a published port. The control API stays on
# loopback unless a token is configured (control.listen: "0.0.0.0:9901" plus
# token_env: GRAYPROXY_TOKEN and -e GRAYPROXY_TOKEN=...); grayproxy refuses to start with a
# non-loopback control address and no token.
#
# The wheel is built in the full image, which has a C compiler: the data path is compiled
# (mypyc, see setup.py). The runtime image gets the wheel and nothing of the build.
FROM python:3.12 AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 grayproxy \
    && useradd --system --uid 10001 --gid grayproxy --no-create-home \
        --shell /usr/sbin/nologin grayproxy \
    && mkdir -p /etc/grayproxy

WORKDIR /etc/grayproxy
# The numeric id of user "grayproxy", so that runAsNonRoot-style checks can verify it.
USER 10001:10001
EXPOSE 8080 9901
ENTRYPOINT ["grayproxy"]
CMD ["run", "-c", "/etc/grayproxy/grayproxy.yaml"]
