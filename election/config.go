package election

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonhq/baton/coord"
)

// Pinger asks another server whether it is alive and which protocols it
// speaks, as PowerJob's /friend/ping does. The server package supplies the
// HTTP implementation.
type Pinger interface {
	// Ping returns the answer of server serverID, whose control endpoint
	// is control. It fails if nothing answered before ctx ended, or if
	// another server answered there (a process restarted on the address
	// under another id): only serverID's own answer shows it alive.
	Ping(ctx context.Context, serverID string, control coord.Endpoint) (PingReply, error)
}

// PingReply is what a live server says about itself.
type PingReply struct {
	// Protocols are its transport addresses.
	Protocols coord.Protocols
	// Unconfirmed says its guard is not confirmed right now: it is alive
	// and owns what it owned, but an app given to it now would wait,
	// with nobody acting, until its guard confirms. Rebalancing gives it
	// nothing until then; elections still take it as alive.
	Unconfirmed bool
}

// Callbacks are called per app, in order, never concurrently for the same
// app; a slow callback of one app never delays another app's.
//
// OnAcquire runs when this server starts owning an app. ctx is cancelled
// the instant the ownership ends, for any reason, before OnLose runs.
// OnAcquire should return promptly and run the app's work under ctx in
// goroutines of its own: the app's next callback waits for it to return.
//
// OnLose runs after the ownership ended, always after the matching
// OnAcquire returned, once per OnAcquire, Close included.
type Callbacks struct {
	OnAcquire func(ctx context.Context, app int64, token int64)
	OnLose    func(app int64, token int64, reason Reason)
}

// clock is the time source of the ping memory and of resignation periods;
// tests replace it (export_test.go). The guard itself always runs on the
// session's clock (CLOCK_BOOTTIME on Linux).
type clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) interface{ Stop() bool }
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) interface{ Stop() bool } {
	return time.AfterFunc(d, f)
}

// Tuning holds the elector's limits and timeouts: what a user may tune
// without touching its wiring. server.Config takes it as is.
type Tuning struct {
	// PingTimeout bounds each ping of a foreign owner. Default 1 s.
	PingTimeout time.Duration
	// LockTimeout bounds waiting for an app's mutex in one attempt.
	// Default 5 s.
	LockTimeout time.Duration
	// RetryTimes is how many attempts an election makes before
	// ErrElectionFailed. Default 10.
	RetryTimes int
	// RetryBase is the first pause between attempts, doubled (with
	// jitter) up to 1 s. Default 50 ms.
	RetryBase time.Duration
	// ElectionConcurrency bounds how many elections this server runs
	// against etcd at once, worker requests and successor takeovers
	// together; the others wait their turn (bounded by their ctx). It
	// keeps a storm of elections — a server dying with thousands of apps
	// — from starving the session's confirmation rounds. Default 16.
	ElectionConcurrency int
	// RebalanceSettle is how long the live-server set must stay unchanged
	// before Rebalance moves any app: a server that joins and leaves again
	// within it (a flapping one) moves nothing. Default 10 s.
	RebalanceSettle time.Duration
	// RebalanceRate bounds how fast Rebalance moves apps away: this
	// fraction of the apps the server owns when it starts a round, per
	// second (at least one app per second). Default 0.02, 2%/s.
	RebalanceRate float64
}

// DefaultTuning returns the default limits and timeouts.
func DefaultTuning() Tuning {
	return Tuning{
		PingTimeout:         time.Second,
		LockTimeout:         5 * time.Second,
		RetryTimes:          10,
		RetryBase:           50 * time.Millisecond,
		ElectionConcurrency: 16,
		RebalanceSettle:     10 * time.Second,
		RebalanceRate:       0.02,
	}
}

// Validate says which field, if any, is out of range (ErrInvalidConfig).
func (t Tuning) Validate() error {
	for _, f := range []struct {
		name string
		v    time.Duration
	}{{"PingTimeout", t.PingTimeout}, {"LockTimeout", t.LockTimeout}, {"RetryBase", t.RetryBase}, {"RebalanceSettle", t.RebalanceSettle}} {
		if f.v < 0 {
			return fmt.Errorf("election: %w: %s (%v) must be positive", ErrInvalidConfig, f.name, f.v)
		}
	}
	if t.RetryTimes < 0 {
		return fmt.Errorf("election: %w: RetryTimes (%d) must be positive", ErrInvalidConfig, t.RetryTimes)
	}
	if t.ElectionConcurrency < 0 {
		return fmt.Errorf("election: %w: ElectionConcurrency (%d) must be positive", ErrInvalidConfig, t.ElectionConcurrency)
	}
	if !(t.RebalanceRate >= 0 && t.RebalanceRate <= 1) { // NaN too
		return fmt.Errorf("election: %w: RebalanceRate (%v) must be between 0 and 1", ErrInvalidConfig, t.RebalanceRate)
	}
	return nil
}

// Config configures an Elector.
type Config struct {
	// ServerID names this server in owner records; it must be the id the
	// server registered its membership under. Required.
	ServerID string
	// Control is where this server answers baton's endpoints: peers ping
	// it there (Pinger) before taking an app from it. Required.
	Control coord.Endpoint
	// Protocols are this server's transport addresses, at least one:
	// Elect answers a worker with the owner's address for the protocol
	// the worker names. Workers are given ExternalAddress when it is set,
	// else Address.
	Protocols coord.Protocols
	// Tuning: zero fields take DefaultTuning's values.
	Tuning
	// Pinger pings foreign owners before taking an app from them. Nil
	// means no ping: an owner whose key exists (its lease is alive in
	// etcd) is always taken as alive.
	Pinger Pinger
	// Callbacks are this server's ownership callbacks; both are optional.
	Callbacks Callbacks
	// Rebalance hands this server's apps to their preferred servers (see
	// Place) when the live-server set changes: a server joins, leaves,
	// changes weight or is cordoned. See the package doc, "Rebalancing".
	Rebalance bool
	// Logger receives the elector's logs; nil discards them.
	Logger hclog.Logger
	// Registerer, if set, receives the elector's Prometheus metrics.
	Registerer prometheus.Registerer

	clock clock // nil: real time
}

// DefaultConfig returns a Config with every default filled in; set
// ServerID, Control and Protocols.
func DefaultConfig() Config {
	return Config{Tuning: DefaultTuning()}
}

func (c Config) withDefaults() (Config, error) {
	d := DefaultTuning()
	if c.PingTimeout == 0 {
		c.PingTimeout = d.PingTimeout
	}
	if c.LockTimeout == 0 {
		c.LockTimeout = d.LockTimeout
	}
	if c.RetryTimes == 0 {
		c.RetryTimes = d.RetryTimes
	}
	if c.RetryBase == 0 {
		c.RetryBase = d.RetryBase
	}
	if c.ElectionConcurrency == 0 {
		c.ElectionConcurrency = d.ElectionConcurrency
	}
	if c.RebalanceSettle == 0 {
		c.RebalanceSettle = d.RebalanceSettle
	}
	if c.RebalanceRate == 0 {
		c.RebalanceRate = d.RebalanceRate
	}
	if c.clock == nil {
		c.clock = realClock{}
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	if err := coord.ValidateName(c.ServerID); err != nil {
		return c, fmt.Errorf("election: %w: ServerID (%q): %v", ErrInvalidConfig, c.ServerID, err)
	}
	if c.Control.Address == "" {
		return c, fmt.Errorf("election: %w: Control.Address is empty", ErrInvalidConfig)
	}
	if err := c.Protocols.Validate(); err != nil {
		return c, fmt.Errorf("election: %w: Protocols: %v", ErrInvalidConfig, err)
	}
	if err := c.Tuning.Validate(); err != nil {
		return c, err
	}
	return c, nil
}
