-- At most one pending join request per user and room. The "already
-- pending?" check and the insert are two statements, so two requests sent
-- at once could both pass it. Earlier duplicates keep the oldest request.
DELETE FROM join_requests
WHERE status = 0 AND EXISTS (
    SELECT 1 FROM join_requests AS older
    WHERE older.room_id = join_requests.room_id AND older.user_id = join_requests.user_id
      AND older.status = 0 AND older.id < join_requests.id
);
CREATE UNIQUE INDEX join_requests_pending ON join_requests (room_id, user_id) WHERE status = 0;
-- Pending requests are read a page at a time, oldest first: the index
-- serves the order and the keyset, with no sort (it covers the old one).
DROP INDEX join_requests_room_status;
CREATE INDEX join_requests_room_status_order ON join_requests (room_id, status, created_at, id);
