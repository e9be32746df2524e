-- Stacker schema, MySQL/MariaDB. Every integer is BIGINT (ids, seqs, Unix ms
-- times, role/policy/status codes, 0/1 booleans); strings are VARCHAR/TEXT in
-- utf8mb4 with a binary collation, so uniqueness and comparisons match SQLite
-- and PostgreSQL (usernames are lower-cased by the domain; search uses name_lower).

CREATE TABLE users (
    id            BIGINT       NOT NULL PRIMARY KEY,
    username      VARCHAR(128) NOT NULL,
    nickname      VARCHAR(255) NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    created_at    BIGINT       NOT NULL,
    UNIQUE KEY users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE rooms (
    id          BIGINT       NOT NULL PRIMARY KEY,
    name        VARCHAR(255) NOT NULL,
    name_lower  VARCHAR(255) NOT NULL,
    is_group    BIGINT       NOT NULL,
    join_policy BIGINT       NOT NULL,
    owner_id    BIGINT       NOT NULL,
    direct_key  VARCHAR(64)  NULL,
    last_seq    BIGINT       NOT NULL DEFAULT 0,
    created_at  BIGINT       NOT NULL,
    UNIQUE KEY rooms_direct_key (direct_key),
    KEY rooms_group_created (is_group, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE room_members (
    room_id       BIGINT       NOT NULL,
    user_id       BIGINT       NOT NULL,
    role          BIGINT       NOT NULL,
    nickname      VARCHAR(255) NOT NULL DEFAULT '',
    mute_until    BIGINT       NOT NULL DEFAULT 0,
    joined_at     BIGINT       NOT NULL,
    read_seq      BIGINT       NOT NULL DEFAULT 0,
    delivered_seq BIGINT       NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id),
    KEY room_members_user (user_id),
    CONSTRAINT room_members_room_fk FOREIGN KEY (room_id) REFERENCES rooms (id),
    CONSTRAINT room_members_user_fk FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE join_requests (
    id         BIGINT        NOT NULL PRIMARY KEY,
    room_id    BIGINT        NOT NULL,
    user_id    BIGINT        NOT NULL,
    message    VARCHAR(1024) NOT NULL,
    status     BIGINT        NOT NULL,
    created_at BIGINT        NOT NULL,
    decided_at BIGINT        NULL,
    KEY join_requests_room_status (room_id, status),
    KEY join_requests_user (user_id),
    CONSTRAINT join_requests_room_fk FOREIGN KEY (room_id) REFERENCES rooms (id),
    CONSTRAINT join_requests_user_fk FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE messages (
    id            BIGINT       NOT NULL PRIMARY KEY,
    room_id       BIGINT       NOT NULL,
    seq           BIGINT       NOT NULL,
    sender_id     BIGINT       NOT NULL,
    client_msg_id VARCHAR(128) NULL,
    content       MEDIUMTEXT   NOT NULL,
    created_at    BIGINT       NOT NULL,
    flags         BIGINT       NOT NULL DEFAULT 0,
    UNIQUE KEY messages_room_seq (room_id, seq),
    UNIQUE KEY messages_sender_client (sender_id, client_msg_id),
    CONSTRAINT messages_room_fk FOREIGN KEY (room_id) REFERENCES rooms (id),
    CONSTRAINT messages_sender_fk FOREIGN KEY (sender_id) REFERENCES users (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Per-device delivery cursors (realtime push); no store trait method yet.
CREATE TABLE device_cursors (
    user_id    BIGINT      NOT NULL,
    device_id  VARCHAR(64) NOT NULL,
    room_id    BIGINT      NOT NULL,
    seq        BIGINT      NOT NULL DEFAULT 0,
    updated_at BIGINT      NOT NULL,
    PRIMARY KEY (user_id, device_id, room_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
