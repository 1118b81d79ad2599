package election

import (
	"errors"
	"fmt"

	"github.com/batonhq/baton/coord"
)

// Errors returned by the elector. Test for them with errors.Is.
var (
	// ErrUnknownApp: the app id is not registered (it is coord's error, so
	// callers test for one value whichever package found it).
	ErrUnknownApp = coord.ErrUnknownApp
	// ErrProtocol: the protocol asked for is not one this server speaks,
	// or the live owner does not speak it.
	ErrProtocol = errors.New("election: unknown protocol")
	// ErrElectionFailed: no owner could be established within RetryTimes
	// attempts; the last cause is wrapped.
	ErrElectionFailed = errors.New("election: election failed")
	// ErrNotReady: this server's lease is not confirmed right now, so it
	// can neither answer from its table nor take an app.
	ErrNotReady = errors.New("election: lease unconfirmed, not ready")
	// ErrNotOwner: this server does not own the app.
	ErrNotOwner = errors.New("election: not owner")
	// ErrClosed: the elector was closed.
	ErrClosed = errors.New("election: closed")
	// ErrInvalidConfig is coord.ErrInvalidConfig: a Config field is out
	// of range; the message names the field and its value.
	ErrInvalidConfig = coord.ErrInvalidConfig
)

// errNotStarted is what a nil *Elector answers — server.Node.Elector
// before the node started — instead of panicking. It is ErrNotReady: the
// server cannot act yet.
var errNotStarted = fmt.Errorf("%w: not started", ErrNotReady)

// Reason says why an ownership ended.
type Reason string

// The reasons passed to OnLose.
const (
	// ReasonResigned: this server gave the app up (Resign, HandOver).
	ReasonResigned Reason = "resigned"
	// ReasonRebalanced: this server handed the app to its preferred
	// server (Config.Rebalance).
	ReasonRebalanced Reason = "rebalanced"
	// ReasonDeposed: another server wrote the owner key, or it was deleted
	// by someone else.
	ReasonDeposed Reason = "deposed"
	// ReasonLeaseUnconfirmed: the session's guard fired; the ownership may
	// come back with the same token when confirmations resume.
	ReasonLeaseUnconfirmed Reason = "lease-unconfirmed"
	// ReasonLeaseLost: etcd lost the server's lease and with it the owner
	// key.
	ReasonLeaseLost Reason = "lease-lost"
	// ReasonClosed: the elector was closed.
	ReasonClosed Reason = "closed"
)
