-- Where an audited request came from: the API key used (its id), the
-- client's address and user agent.
alter table audit_entries
    add column api_key_id uuid,
    add column ip text,
    add column user_agent text;
