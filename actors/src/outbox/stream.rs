//! The v2 meter event stream: a session token replaced ahead of its expiry, up to 100 events
//! per request.

use super::*;

/// How long before its expiry a meter event session is replaced: a quarter of its lifetime,
/// at most a minute (Stripe's sessions last 15 minutes: replaced after 14).
pub fn session_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(Duration::from_secs(60))
}

impl OutboxState {
    /// Stream mode: sends `ready` in requests of up to [`STREAM_MAX_EVENTS`] events, up to
    /// `concurrency` requests at a time (each start paced: one request is one call), all with
    /// the current session's token. A request refused for its token (expired) creates a new
    /// session and is sent again once. Each event of a request settles with the request's
    /// outcome: sent only after the stream's 200.
    pub(super) async fn send_stream(
        &mut self,
        client: &StripeHttp,
        ready: Vec<Ready>,
        now: i64,
        half_open: bool,
    ) -> Result<(), ActorProcessingErr> {
        let width = self.args.settings.concurrency.max(1);
        let mut requests: Vec<Vec<Ready>> = Vec::new();
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            requests.push(ready.by_ref().take(STREAM_MAX_EVENTS).collect());
        }
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let group: Vec<Vec<Ready>> = requests.by_ref().take(width).collect();
            let mut results: Vec<Option<Result<(), StripeCallError>>> =
                (0..group.len()).map(|_| None).collect();
            // Without a session no request was sent: one failed call, not one per request.
            let mut no_session = false;
            match self.stream_session(client).await {
                Err(e) => {
                    no_session = true;
                    tracing::warn!(error = %e, "Stripe: cannot create a meter event session");
                    for r in &mut results {
                        *r = Some(Err(e.clone()));
                    }
                }
                Ok(token) => {
                    let mut sends = tokio::task::JoinSet::new();
                    for (i, request) in group.iter().enumerate() {
                        self.pace().await;
                        self.stats.calls_total += 1;
                        self.stats.stream_requests_total += 1;
                        let events: Vec<StreamEvent> = request
                            .iter()
                            .map(|(account, seq, record, customer, event_name)| StreamEvent {
                                event_name: event_name.clone(),
                                identifier: record_identifier(account, *seq, record),
                                customer: customer.clone(),
                                value: record.item.value,
                                // Whole seconds, as v1 sends them.
                                timestamp_ms: record.item.at_ms.div_euclid(1000) * 1000,
                            })
                            .collect();
                        let client = client.clone();
                        let token = token.clone();
                        sends.spawn(async move {
                            let r = client.send_meter_event_stream(&token, &events).await;
                            match r {
                                Err(e) if e.is_session_expired() => {
                                    match client.create_meter_event_session().await {
                                        Ok(s) => {
                                            let r = client
                                                .send_meter_event_stream(&s.token, &events)
                                                .await;
                                            (i, r, Some(s))
                                        }
                                        Err(e) => (i, Err(e), None),
                                    }
                                }
                                r => (i, r, None),
                            }
                        });
                    }
                    while let Some(joined) = sends.join_next().await {
                        if let Ok((i, r, fresh)) = joined {
                            if let Some(s) = fresh {
                                self.stats.sessions_total += 1;
                                self.stats.calls_total += 1;
                                tracing::debug!(
                                    "Stripe: the meter event session expired; a new one was created"
                                );
                                self.adopt_session(s);
                            }
                            if let Some(slot) = results.get_mut(i) {
                                *slot = Some(r);
                            }
                        }
                    }
                }
            }
            let mut opened = false;
            for (i, (request, result)) in group.into_iter().zip(results).enumerate() {
                // A send task that did not finish counts as a network failure: retried.
                let result = match result {
                    None => Err(StripeCallError::Network("send task failed".into())),
                    // A token refused even when fresh: a problem of the session, not of the
                    // events (never dead-letter them for it).
                    Some(Err(StripeCallError::Api {
                        status: 401,
                        code,
                        message,
                        retry_after,
                        ..
                    })) => Err(StripeCallError::Api {
                        status: 401,
                        code,
                        message,
                        should_retry: Some(true),
                        retry_after,
                    }),
                    Some(r) => r,
                };
                for (k, (account, seq, record, _, _)) in request.into_iter().enumerate() {
                    opened |= self.settle(
                        &account,
                        seq,
                        record,
                        result.clone(),
                        now,
                        half_open,
                        k == 0 && (i == 0 || !no_session),
                    )?;
                }
            }
            if opened {
                break;
            }
        }
        Ok(())
    }

    /// The token of a meter event session valid for a while yet: the current one, or a new
    /// one (created [`session_margin`] before the current one expires).
    pub(super) async fn stream_session(
        &mut self,
        client: &StripeHttp,
    ) -> Result<String, StripeCallError> {
        if let Some((s, refresh_at)) = &self.session
            && tokio::time::Instant::now() < *refresh_at
        {
            return Ok(s.token.clone());
        }
        self.stats.calls_total += 1;
        let s = client.create_meter_event_session().await?;
        self.stats.sessions_total += 1;
        let token = s.token.clone();
        self.adopt_session(s);
        Ok(token)
    }

    /// Uses `s` from now on, until shortly before it expires. Its lifetime is measured by
    /// Stripe's own `created` and `expires_at` and counted on the local monotonic clock, so a
    /// skewed local clock cannot keep an expired token.
    pub(super) fn adopt_session(&mut self, s: MeterEventSession) {
        let lifetime =
            Duration::from_secs(u64::try_from(s.expires_at_s - s.created_s).unwrap_or(0));
        let refresh_at =
            tokio::time::Instant::now() + lifetime.saturating_sub(session_margin(lifetime));
        self.session = Some((s, refresh_at));
    }
}
