-- Stacker schema, PostgreSQL. Every integer is BIGINT (ids, seqs, Unix ms times,
-- role/policy/status codes, 0/1 booleans); strings are TEXT.

CREATE TABLE users (
    id            BIGINT NOT NULL PRIMARY KEY,
    username      TEXT   NOT NULL,
    nickname      TEXT   NOT NULL,
    password_hash TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    CONSTRAINT users_username UNIQUE (username)
);

CREATE TABLE rooms (
    id          BIGINT NOT NULL PRIMARY KEY,
    name        TEXT   NOT NULL,
    -- lower-cased name for case-insensitive search (Unicode-aware, done in Rust)
    name_lower  TEXT   NOT NULL,
    is_group    BIGINT NOT NULL,
    join_policy BIGINT NOT NULL,
    owner_id    BIGINT NOT NULL,
    direct_key  TEXT   NULL,
    last_seq    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    CONSTRAINT rooms_direct_key UNIQUE (direct_key)
);
CREATE INDEX rooms_group_created ON rooms (is_group, created_at);

CREATE TABLE room_members (
    room_id       BIGINT NOT NULL REFERENCES rooms (id),
    user_id       BIGINT NOT NULL REFERENCES users (id),
    role          BIGINT NOT NULL,
    nickname      TEXT   NOT NULL DEFAULT '',
    mute_until    BIGINT NOT NULL DEFAULT 0,
    joined_at     BIGINT NOT NULL,
    read_seq      BIGINT NOT NULL DEFAULT 0,
    delivered_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user ON room_members (user_id);

CREATE TABLE join_requests (
    id         BIGINT NOT NULL PRIMARY KEY,
    room_id    BIGINT NOT NULL REFERENCES rooms (id),
    user_id    BIGINT NOT NULL REFERENCES users (id),
    message    TEXT   NOT NULL,
    status     BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    decided_at BIGINT NULL
);
CREATE INDEX join_requests_room_status ON join_requests (room_id, status);
CREATE INDEX join_requests_user ON join_requests (user_id);

CREATE TABLE messages (
    id            BIGINT NOT NULL PRIMARY KEY,
    room_id       BIGINT NOT NULL REFERENCES rooms (id),
    seq           BIGINT NOT NULL,
    sender_id     BIGINT NOT NULL REFERENCES users (id),
    client_msg_id TEXT   NULL,
    content       TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    flags         BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT messages_room_seq UNIQUE (room_id, seq),
    CONSTRAINT messages_sender_client UNIQUE (sender_id, client_msg_id)
);

-- Per-device delivery cursors (realtime push); no store trait method yet.
CREATE TABLE device_cursors (
    user_id    BIGINT      NOT NULL,
    device_id  VARCHAR(64) NOT NULL,
    room_id    BIGINT      NOT NULL,
    seq        BIGINT      NOT NULL DEFAULT 0,
    updated_at BIGINT      NOT NULL,
    PRIMARY KEY (user_id, device_id, room_id)
);
