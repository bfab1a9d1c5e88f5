//! Object storage (S3-compatible) for generated media.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use uuid::Uuid;

/// Where everything of one account is stored: its uploads and its
/// generations' outputs (deleted together when the account is purged).
pub fn account_prefix(account_id: Uuid) -> String {
    format!("users/{account_id}/")
}

#[derive(Clone)]
pub struct StorageSettings {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSettings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"…")
            .finish()
    }
}

#[derive(Clone)]
pub struct Storage {
    client: Client,
    bucket: String,
}

impl Storage {
    pub fn new(s: &StorageSettings) -> Self {
        let creds = Credentials::new(&s.access_key_id, &s.secret_access_key, None, None, "slate");
        // Every call is bounded: a storage server that accepts a
        // connection and then says nothing would otherwise hold a
        // generation's attempt (and what it was paid for) for ever.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .operation_attempt_timeout(std::time::Duration::from_secs(120))
            .operation_timeout(std::time::Duration::from_secs(300))
            .build();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .region(Region::new(s.region.clone()))
            .endpoint_url(&s.endpoint)
            .credentials_provider(creds)
            .force_path_style(true)
            .build();
        Self {
            client: Client::from_conf(config),
            bucket: s.bucket.clone(),
        }
    }

    /// Create the bucket if it is missing.
    pub async fn ensure_bucket(&self) -> anyhow::Result<()> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await?;
        Ok(())
    }

    /// Is the storage reachable and the bucket there?
    pub async fn check(&self) -> anyhow::Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await?;
        Ok(())
    }

    pub async fn put(
        &self,
        key: &str,
        body: impl Into<bytes::Bytes>,
        content_type: &str,
    ) -> anyhow::Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body.into()))
            .send()
            .await?;
        Ok(())
    }

    /// Whether an object is stored under `key` (an error when the storage
    /// could not say).
    pub async fn exists(&self, key: &str) -> anyhow::Result<bool> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await?;
        Ok(out.body.collect().await?.into_bytes().to_vec())
    }
}

impl Storage {
    /// A URL that serves the object for `ttl`, to whoever holds it.
    pub async fn presign_get(&self, key: &str, ttl: std::time::Duration) -> anyhow::Result<String> {
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl)?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await?;
        Ok(req.uri().to_owned())
    }

    /// The keys under `prefix`, every page of them.
    pub async fn list_prefix(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self.listing(prefix).send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| listing_failed(prefix, e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(keys)
    }

    /// The listing of `prefix`, page by page (1,000 keys at most each).
    fn listing(
        &self,
        prefix: &str,
    ) -> aws_sdk_s3::operation::list_objects_v2::paginator::ListObjectsV2Paginator {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
    }

    /// Delete every object under `prefix` (idempotent); how many there were.
    /// A page of the listing (1,000 keys at most) at a time, each page in one
    /// `DeleteObjects` request: one request per object took an account's
    /// purge a round trip per output it ever made, and held every key in
    /// memory first. A key S3 could not delete fails the call (the purge
    /// tries again; what was deleted stays deleted).
    pub async fn delete_prefix(&self, prefix: &str) -> anyhow::Result<usize> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        let mut deleted = 0;
        let mut pages = self.listing(prefix).send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| listing_failed(prefix, e))?;
            let objects = page
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .map(|key| ObjectIdentifier::builder().key(key).build())
                .collect::<Result<Vec<_>, _>>()?;
            if objects.is_empty() {
                continue;
            }
            let count = objects.len();
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(
                    Delete::builder()
                        .set_objects(Some(objects))
                        .quiet(true)
                        .build()?,
                )
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("deleting objects: {}", e.into_service_error()))?;
            if let Some(failed) = out.errors().first() {
                anyhow::bail!(
                    "deleting objects: {} of {count} not deleted ({})",
                    out.errors().len(),
                    failed.code().unwrap_or("no code")
                );
            }
            deleted += count;
        }
        Ok(deleted)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

fn listing_failed(
    prefix: &str,
    e: aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Error>,
) -> anyhow::Error {
    anyhow::anyhow!("listing {prefix}: {}", e.into_service_error())
}
