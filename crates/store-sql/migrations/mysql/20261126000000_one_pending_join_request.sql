-- At most one pending join request per user and room. The "already
-- pending?" check and the insert are two statements, so two requests sent
-- at once could both pass it. Earlier duplicates keep the oldest request.
DELETE newer FROM join_requests AS newer
JOIN join_requests AS older
  ON older.room_id = newer.room_id AND older.user_id = newer.user_id
 AND older.status = 0 AND older.id < newer.id
WHERE newer.status = 0;
-- MySQL has no partial index: the user id only while pending (NULL, which
-- a unique index does not compare, once decided). One ALTER: DDL commits
-- on its own, and the column is of no use without the index.
-- Pending requests are read a page at a time, oldest first: the last index
-- serves the order and the keyset, with no sort (it covers the old one).
ALTER TABLE join_requests
    ADD COLUMN pending_user_id BIGINT AS (CASE WHEN status = 0 THEN user_id END) STORED,
    ADD UNIQUE INDEX join_requests_pending (room_id, pending_user_id),
    DROP INDEX join_requests_room_status,
    ADD INDEX join_requests_room_status_order (room_id, status, created_at, id);
