# Builds the stacker binary (all roles) and stacker-cli.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p stacker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/stacker /src/target/release/stacker-cli /usr/local/bin/
COPY stacker.example.yaml /etc/stacker/stacker.example.yaml
ENV STACKER_DATA_DIR=/var/lib/stacker
VOLUME /var/lib/stacker
EXPOSE 8080 8081 8082 8083 8084
ENTRYPOINT ["stacker"]
CMD ["standalone"]
