package coord

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/backoff"
	"github.com/batonhq/baton/internal/keyspace"
)

// SessionConfig configures a Session. Durations derived from the TTL are
// derived from the TTL etcd actually granted.
type SessionConfig struct {
	// Client is the caller's etcd client; the session never closes it.
	// Required.
	Client *clientv3.Client
	// Prefix is the etcd key prefix of the deployment; each round's
	// linearizable read counts its owner keys. Default DefaultPrefix.
	Prefix string
	// TTL is the lease TTL to ask etcd for, a whole number of seconds, at
	// least 1 s. Default 5 s. etcd may grant more (2 s minimum with
	// default raft timings); the session then uses what was granted.
	TTL time.Duration
	// Margin is how long before the lease could expire in etcd the guard
	// stops the server. Default max(TTL/10, 200 ms).
	Margin time.Duration
	// RoundInterval is the time between the starts of two confirmation
	// rounds. Default TTL/3. Must leave room for a round before the guard
	// fires: RoundInterval < TTL - Margin. A slow round delays the next
	// one; a round is abandoned once it could no longer extend the
	// deadline (TTL - Margin after it started), and retried at once.
	RoundInterval time.Duration
	// OnLease, if set, is called with every lease the session obtains,
	// the first one included, before any epoch of that lease starts: the
	// place to (re-)write keys bound to the lease, such as the server's
	// membership key. An error is logged and the call retried after a
	// short pause. ctx ends when the session closes.
	OnLease func(ctx context.Context, lease clientv3.LeaseID) error
	// Logger receives the session's logs. Nil discards them.
	Logger hclog.Logger
	// Registerer, if set, receives the session's metrics until Close.
	Registerer prometheus.Registerer
}

// ValidateTTL says whether ttl can be a server's lease TTL: at least 1 s,
// in whole seconds (etcd grants leases in seconds).
func ValidateTTL(ttl time.Duration) error {
	if ttl < time.Second {
		return errors.New("must be at least 1s")
	}
	if ttl%time.Second != 0 {
		return errors.New("must be a whole number of seconds: etcd grants leases in seconds")
	}
	return nil
}

func (c *SessionConfig) withDefaults() (SessionConfig, error) {
	out := *c
	if out.Client == nil {
		return out, fmt.Errorf("coord: %w: SessionConfig.Client is nil", ErrInvalidConfig)
	}
	if err := ValidatePrefix(out.Prefix); err != nil {
		return out, fmt.Errorf("coord: %w: SessionConfig.Prefix (%q): %v", ErrInvalidConfig, out.Prefix, err)
	}
	if out.Prefix == "" {
		out.Prefix = DefaultPrefix
	}
	if out.TTL == 0 {
		out.TTL = 5 * time.Second
	}
	if err := ValidateTTL(out.TTL); err != nil {
		return out, fmt.Errorf("coord: %w: SessionConfig.TTL (%v): %v", ErrInvalidConfig, out.TTL, err)
	}
	if out.Margin < 0 {
		return out, fmt.Errorf("coord: %w: SessionConfig.Margin (%v) must not be negative", ErrInvalidConfig, out.Margin)
	}
	if out.RoundInterval < 0 {
		return out, fmt.Errorf("coord: %w: SessionConfig.RoundInterval (%v) must not be negative", ErrInvalidConfig, out.RoundInterval)
	}
	margin, interval := out.timings(out.TTL)
	if interval >= out.TTL-margin {
		return out, fmt.Errorf("coord: %w: SessionConfig.RoundInterval (%v) must be shorter than TTL (%v) minus Margin (%v)",
			ErrInvalidConfig, interval, out.TTL, margin)
	}
	if out.Logger == nil {
		out.Logger = hclog.NewNullLogger()
	}
	return out, nil
}

// timings returns the margin and round interval for a granted TTL.
func (c *SessionConfig) timings(ttl time.Duration) (margin, interval time.Duration) {
	margin, interval = c.Margin, c.RoundInterval
	if margin == 0 {
		margin = max(ttl/10, 200*time.Millisecond)
	}
	if interval == 0 {
		interval = ttl / 3
	}
	return margin, interval
}

// Session is a server's one etcd lease, kept alive by confirmation rounds
// and watched over by a guard (see the package documentation). It starts a
// fresh lease by itself when etcd loses the old one. A Session is safe for
// concurrent use; Close stops everything it started.
type Session struct {
	cfg     SessionConfig
	keys    keyspace.Keys
	cli     *clientv3.Client
	logger  hclog.Logger
	clock   *bootClock
	watch   watchTracker
	metrics *sessionMetrics

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	lease clientv3.LeaseID
	ttl   time.Duration
	epoch *Epoch // current or most recently ended
	// behindSince is when the current run of rounds that failed only at
	// the watch step began (0: the last round did not fail that way). A
	// lease whose rounds fail that way for a whole TTL is given up.
	behindSince int64
	newEpoch    chan struct{} // closed when epoch is replaced
	guard       *time.Timer
	closed      bool
}

// NewSession grants a lease, calls OnLease, and returns once a first round
// has confirmed it, or fails when ctx ends first. On failure it revokes
// what it granted, trying for at most 100 ms once ctx has ended: a lease
// whose revoke fails expires on its own a TTL later.
func NewSession(ctx context.Context, cfg SessionConfig) (*Session, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	keys, _ := keyspace.New(cfg.Prefix) // validated by withDefaults
	s := &Session{
		cfg:      cfg,
		keys:     keys,
		cli:      cfg.Client,
		logger:   cfg.Logger.Named("session"),
		clock:    newBootClock(),
		newEpoch: make(chan struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.watch.init()
	// Until the first round confirms, the session has an ended epoch so
	// that Epoch() is never nil.
	s.epoch = newEpoch(s.clock, 0, 0, 0)
	s.epoch.end(ErrUnconfirmed)
	if s.metrics, err = newSessionMetrics(cfg.Registerer, s); err != nil {
		return nil, err
	}

	// Bind the setup to both the caller's ctx and Close, and end it at
	// once if etcd refuses the client's TLS: no retry can fix that.
	setup, stop := context.WithCancelCause(s.ctx)
	defer stop(nil)
	defer context.AfterFunc(ctx, func() { stop(nil) })()
	var watching sync.WaitGroup
	defer watching.Wait()
	defer stop(nil)
	watching.Go(func() { stopOnHandshakeFailure(setup, stop, s.cli) })
	if err := s.establish(setup); err != nil {
		if cause := context.Cause(setup); cause != nil && !errors.Is(cause, context.Canceled) {
			err = cause
		}
		s.cancel()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 100*time.Millisecond)
		if d, ok := ctx.Deadline(); ok && time.Until(d) > 100*time.Millisecond {
			rctx, cancel = context.WithDeadline(context.WithoutCancel(ctx), d)
		}
		s.revoke(rctx)
		cancel()
		s.metrics.unregister()
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("coord: new session: %w: %w", ctx.Err(), err)
		}
		return nil, err
	}
	s.wg.Go(s.run)
	return s, nil
}

// startLease grants a lease and calls OnLease; it retries OnLease until it
// succeeds or ctx ends.
func (s *Session) startLease(ctx context.Context) error {
	grant, err := s.cli.Grant(clientv3.WithRequireLeader(ctx), int64(s.cfg.TTL/time.Second))
	if err != nil {
		return fmt.Errorf("coord: grant lease: %w", err)
	}
	ttl := time.Duration(grant.TTL) * time.Second
	s.mu.Lock()
	s.lease, s.ttl = grant.ID, ttl
	s.behindSince = 0
	s.mu.Unlock()
	if ttl != s.cfg.TTL {
		s.logger.Info("etcd granted a longer ttl than asked", "asked", s.cfg.TTL, "granted", ttl)
	}
	s.logger.Debug("lease granted", "lease", fmt.Sprintf("%x", grant.ID), "ttl", ttl)
	var last error // the last failure not caused by ctx ending mid-call
	for s.cfg.OnLease != nil {
		err := s.cfg.OnLease(ctx, grant.ID)
		if err == nil {
			break
		}
		if ctx.Err() == nil || last == nil {
			last = err
		}
		if errors.Is(err, rpctypes.ErrPermissionDenied) {
			// This identity may not write here: retrying cannot help.
			return fmt.Errorf("coord: lease callback: %w", err)
		}
		s.logger.Warn("lease callback failed, retrying", "error", err)
		if backoff.Sleep(ctx, s.retryPause()) != nil {
			return fmt.Errorf("coord: lease callback: %w", last)
		}
		// No round keeps the lease alive until it is confirmed: the
		// retries do (a restarted server can wait here a whole TTL for
		// its previous process's membership key to expire), and a lease
		// that expired meanwhile is replaced.
		if _, err := s.cli.KeepAliveOnce(clientv3.WithRequireLeader(ctx), grant.ID); isLeaseNotFound(err) {
			return errGaveUp
		}
	}
	return nil
}

// establish starts a lease and confirms it, starting another if one is
// given up.
func (s *Session) establish(ctx context.Context) error {
	for {
		err := s.startLease(ctx)
		if err == nil {
			err = s.confirmFirst(ctx)
		}
		if !errors.Is(err, errGaveUp) {
			return err
		}
	}
}

// errGaveUp: the lease was given up before it was confirmed — kept alive
// but never confirmed (see stale), or expired while its OnLease callback
// was being retried — and a new one is needed.
var errGaveUp = errors.New("coord: lease given up")

// stale records a round's outcome and reports whether it shows a lease
// that etcd keeps alive and answers for (the keepalive and the read
// succeeded) while the watch has not caught up in any round for a whole
// TTL. Such a lease must go: it keeps this server's keys, and with them
// its apps and its place as successor, while the server cannot act. Only
// an unbroken run of such rounds counts: a round failing at the keepalive
// or the read is etcd being slow or unreachable (a write storm, an
// outage), which passes, after which the same lease and tokens come back;
// and after an outage the watch gets a full TTL to be restarted.
func (s *Session) stale(res roundResult) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !res.watchBehind || res.lease != s.lease {
		s.behindSince = 0
		return false
	}
	if s.behindSince == 0 {
		s.behindSince = res.start
		return false
	}
	return s.clock.now() >= s.behindSince+int64(s.ttl)
}

// giveUp revokes lease (best effort: if the revoke fails too, the lease
// expires a TTL after the last keepalive) and ends the epoch with
// ErrLeaseLost.
func (s *Session) giveUp(lease clientv3.LeaseID, cause error) {
	s.logger.Warn("lease kept alive but unconfirmed for a TTL past its deadline; giving it up so that other servers take its apps",
		"lease", fmt.Sprintf("%x", lease), "last_error", cause,
		"hint", "if this server reaches etcd through etcd's gRPC proxy, point it at the etcd members: the proxy drops watch progress requests, which the guard needs")
	ctx, cancel := context.WithTimeout(s.ctx, s.interval())
	defer cancel()
	if _, err := s.cli.Revoke(ctx, lease); err != nil && !isLeaseNotFound(err) {
		s.logger.Warn("revoking the given-up lease failed; it expires on its own", "error", err)
	}
	s.endEpoch(ErrLeaseLost)
}

// confirmFirst runs rounds until one confirms the new lease, or gives the
// lease up (errGaveUp) when it stays unconfirmed.
func (s *Session) confirmFirst(ctx context.Context) error {
	for {
		res := s.round(ctx)
		if res.err == nil {
			s.apply(res)
			return nil
		}
		if s.stale(res) {
			s.giveUp(res.lease, res.err)
			return errGaveUp
		}
		if errors.Is(res.err, ErrLeaseLost) {
			return res.err
		}
		if err := backoff.Sleep(ctx, s.retryPause()); err != nil {
			return fmt.Errorf("%w (last round: %w)", err, res.err)
		}
	}
}

// run is the session's one goroutine: a round every RoundInterval, a
// quick retry after a failed one, a new lease after a lost one.
func (s *Session) run() {
	next := time.NewTimer(s.interval())
	defer next.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-next.C:
		}
		start := time.Now()
		res := s.round(s.ctx)
		s.metrics.round(time.Since(start), res.err == nil)
		switch {
		case res.err == nil:
			s.apply(res)
			next.Reset(max(s.interval()-time.Since(start), 0))
		case errors.Is(res.err, ErrLeaseLost):
			s.endEpoch(ErrLeaseLost)
			s.metrics.leaseEnded("lost")
			s.logger.Warn("lease lost, starting a new one", "lease", fmt.Sprintf("%x", res.lease))
			if err := s.renew(); err != nil {
				return // closed
			}
			next.Reset(s.interval())
		case s.stale(res):
			s.giveUp(res.lease, res.err)
			s.metrics.leaseEnded("given_up")
			if err := s.renew(); err != nil {
				return // closed
			}
			next.Reset(s.interval())
		default:
			if s.ctx.Err() != nil {
				return
			}
			s.logger.Debug("confirmation round failed", "error", res.err)
			next.Reset(s.retryPause())
		}
	}
}

// renew starts a new lease and confirms it, retrying until it works or
// the session closes.
func (s *Session) renew() error {
	for {
		err := s.establish(s.ctx)
		if err == nil || s.ctx.Err() != nil {
			return s.ctx.Err()
		}
		s.logger.Warn("could not start a new lease, retrying", "error", err)
		if err := backoff.Sleep(s.ctx, s.retryPause()); err != nil {
			return err
		}
	}
}

// roundResult is what one confirmation round established.
type roundResult struct {
	lease clientv3.LeaseID
	start int64         // when the round started, bootClock
	ttl   time.Duration // TTL the keepalive acknowledged
	err   error
	// watchBehind: the keepalive and the read succeeded, and only the
	// watch failed to catch up.
	watchBehind bool
}

// round runs one confirmation round (see the package documentation):
// a keepalive, a linearizable read giving revision R, and — when a watch
// is attached — waiting for the watch to be caught up to R. Every step is
// sent after start, which is what makes start a safe base for the
// deadline.
func (s *Session) round(ctx context.Context) roundResult {
	s.mu.Lock()
	res := roundResult{lease: s.lease, start: s.clock.now()}
	s.mu.Unlock()
	// A round is worth finishing until the deadline it could set has
	// passed; abandoning it earlier would only throw away work on a slow
	// but healthy connection.
	ttl := s.TTL()
	margin, _ := s.cfg.timings(ttl)
	ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), ttl-margin)
	defer cancel()

	// Step timings, logged when a round is slow enough to matter.
	var kaDone, readDone time.Duration
	defer func() {
		if total := time.Duration(s.clock.now() - res.start); total > ttl/3 {
			args := []any{"total", total, "keepalive", kaDone}
			if readDone > 0 {
				args = append(args, "read", readDone-kaDone, "watch_progress", total-readDone)
			}
			s.logger.Warn("slow confirmation round", append(args, "error", res.err)...)
		}
	}()
	ka, err := s.cli.KeepAliveOnce(ctx, res.lease)
	kaDone = time.Duration(s.clock.now() - res.start)
	if err != nil {
		if isLeaseNotFound(err) {
			res.err = fmt.Errorf("%w: %x", ErrLeaseLost, res.lease)
		} else {
			res.err = fmt.Errorf("coord: keepalive: %w", err)
		}
		return res
	}
	res.ttl = time.Duration(ka.TTL) * time.Second
	start, end := s.keys.OwnershipRange()
	get, err := s.cli.Get(ctx, start, clientv3.WithRange(end), clientv3.WithCountOnly())
	readDone = time.Duration(s.clock.now() - res.start)
	if err != nil {
		res.err = fmt.Errorf("coord: linearizable read: %w", err)
		return res
	}
	if err := s.watch.waitCaughtUp(ctx, get.Header.Revision, s.retryPause()); err != nil {
		res.err = fmt.Errorf("coord: watch progress to revision %d: %w", get.Header.Revision, err)
		res.watchBehind = true
	}
	return res
}

// apply turns a successful round into a deadline: the current epoch is
// extended, or — if it has ended while the lease survived, or if this is a
// new lease — a new epoch starts.
func (s *Session) apply(res roundResult) {
	margin, _ := s.cfg.timings(res.ttl)
	deadline := res.start + int64(res.ttl-margin)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || res.lease != s.lease || deadline <= s.clock.now() {
		return
	}
	s.behindSince = 0
	if s.epoch.lease == res.lease && s.epoch.extend(deadline) {
		s.armGuard()
		return
	}
	s.epoch.end(ErrUnconfirmed) // in case it is still open but expired
	s.epoch = newEpoch(s.clock, res.lease, res.ttl, deadline)
	close(s.newEpoch)
	s.newEpoch = make(chan struct{})
	s.armGuard()
	s.logger.Debug("epoch started", "lease", fmt.Sprintf("%x", res.lease), "deadline_in", time.Duration(deadline-s.clock.now()))
}

// armGuard makes sure the guard timer fires at the current epoch's
// deadline. Go's timers stop while the host is suspended and the guard's
// clock does not, so the timer never waits longer than the margin: after
// a resume, an expired epoch ends within a margin (and Check refuses at
// once). Called with s.mu held.
func (s *Session) armGuard() {
	margin, _ := s.cfg.timings(s.epoch.ttl)
	wait := min(time.Duration(s.epoch.deadline.Load()-s.clock.now()), margin)
	if s.guard == nil {
		s.guard = time.AfterFunc(wait, s.guardFired)
		return
	}
	s.guard.Reset(wait)
}

// guardFired ends the epoch if its deadline has really passed (it may have
// been extended since the timer was set).
func (s *Session) guardFired() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.epoch.Err() != nil {
		return
	}
	if s.epoch.Check() != nil {
		s.epoch.end(ErrUnconfirmed)
		s.metrics.guardFired()
		s.logger.Warn("guard fired: lease unconfirmed, stop acting as owner", "lease", fmt.Sprintf("%x", s.epoch.lease))
		return
	}
	s.armGuard()
}

func (s *Session) endEpoch(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.epoch.end(err)
}

// Epoch returns the current epoch, or the one that ended most recently
// while no new one has started. It never returns nil and never blocks.
func (s *Session) Epoch() *Epoch {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.epoch
}

// NextEpoch blocks until an epoch other than prev is current and live,
// and returns it; it fails when ctx ends or the session closes.
func (s *Session) NextEpoch(ctx context.Context, prev *Epoch) (*Epoch, error) {
	for {
		s.mu.Lock()
		ep, changed, closed := s.epoch, s.newEpoch, s.closed
		s.mu.Unlock()
		if closed {
			return nil, ErrSessionClosed
		}
		if ep != prev && ep.Err() == nil {
			return ep, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-s.ctx.Done():
			return nil, ErrSessionClosed
		}
	}
}

// Check is Epoch().Check(): nil while the server may act as owner.
func (s *Session) Check() error { return s.Epoch().Check() }

// Lease returns the session's current lease. After a loss it changes.
func (s *Session) Lease() clientv3.LeaseID {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lease
}

// TTL returns the TTL etcd granted for the current lease.
func (s *Session) TTL() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ttl
}

// Margin returns the guard margin for the current lease's TTL.
func (s *Session) Margin() time.Duration {
	m, _ := s.cfg.timings(s.TTL())
	return m
}

// Prefix returns the etcd key prefix the session was configured with.
func (s *Session) Prefix() string { return s.cfg.Prefix }

// Client returns the etcd client the session uses.
func (s *Session) Client() *clientv3.Client { return s.cli }

func (s *Session) interval() time.Duration {
	_, i := s.cfg.timings(s.TTL())
	return i
}

// retryPause is how long to wait after a failed round or grant: short,
// so that a healed connection is confirmed quickly.
func (s *Session) retryPause() time.Duration { return min(s.interval()/4, 100*time.Millisecond) }

// Close stops the rounds, ends the current epoch with ErrSessionClosed and
// revokes the lease, so that every key bound to it disappears at once. It
// waits for the revoke until ctx ends (or for one TTL when ctx has no
// deadline). It is idempotent; later calls return nil.
func (s *Session) Close(ctx context.Context) error {
	if !s.shutdown() {
		return nil
	}
	return s.revoke(ctx)
}

// abandon stops the session without revoking its lease, as a crash would:
// the lease and its keys live until etcd expires them (hooks.AbandonSession).
func (s *Session) abandon() { s.shutdown() }

func (s *Session) shutdown() bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	s.closed = true
	s.epoch.end(ErrSessionClosed)
	if s.guard != nil {
		s.guard.Stop()
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	s.metrics.unregister()
	return true
}

func (s *Session) revoke(ctx context.Context) error {
	s.mu.Lock()
	lease, ttl := s.lease, s.ttl
	s.mu.Unlock()
	if lease == 0 {
		return nil
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, max(ttl, time.Second))
		defer cancel()
	}
	if _, err := s.cli.Revoke(ctx, lease); err != nil && !isLeaseNotFound(err) {
		return fmt.Errorf("coord: revoke lease %x: %w", lease, err)
	}
	return nil
}

func isLeaseNotFound(err error) bool {
	return errors.Is(err, rpctypes.ErrLeaseNotFound) || errors.Is(err, rpctypes.ErrGRPCLeaseNotFound) ||
		rpctypes.ErrorDesc(err) == rpctypes.ErrGRPCLeaseNotFound.Error()
}
