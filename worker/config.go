package worker

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

// ErrInvalidConfig is coord.ErrInvalidConfig, the one error every baton
// package returns for a configuration field out of range; the message
// names the field and its value.
var ErrInvalidConfig = coord.ErrInvalidConfig

// ErrNoServer: no server could be found (Start without AllowLazyConnect).
var ErrNoServer = errors.New("worker: no server available")

// clock is the time source of the discovery rounds; tests replace it
// (export_test.go).
type clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Config configures a Discovery.
type Config struct {
	// AppName is the app this worker belongs to. Required.
	AppName string
	// Servers are the control addresses (host:port, PowerJob's web port)
	// of scheduler servers, asked over HTTP when etcd cannot tell; write
	// https://host:port for one that serves HTTPS (HTTPClient must then
	// trust its certificate). May be empty only when Client is set.
	Servers []string
	// Protocol is the transport protocol whose address the worker wants
	// ("HTTP", "AKKA", or any name the servers offer). Default "HTTP".
	Protocol string
	// Client, if set, is used to resolve the app and to watch its owner
	// key; the worker never closes it. Nil means PowerJob's polling only.
	Client *clientv3.Client
	// Prefix is the etcd key prefix. Default coord.DefaultPrefix.
	Prefix string
	// Interval is the time between discovery rounds while polling.
	// Default 10 s (PowerJob's).
	Interval time.Duration
	// PingTimeout bounds connecting to a server. Default 1 s.
	PingTimeout time.Duration
	// RequestTimeout bounds one HTTP request, connection included.
	// Default 3 s.
	RequestTimeout time.Duration
	// Tries is how many times each server is asked in a round. Default 3.
	Tries int
	// TryPause is the pause between two tries of one server. Default
	// 100 ms.
	TryPause time.Duration
	// MaxFailedRounds is how many consecutive rounds without a server make
	// the worker isolated (OnIsolated). Default 3.
	MaxFailedRounds int
	// EtcdGrace is how long etcd may be unreachable (its connection not
	// ready) before the worker falls back to polling. Default 3 s. gRPC
	// notices a silently dead connection only after its keepalive (about
	// 12 s with coord.ClientConfig); a refused one at once.
	EtcdGrace time.Duration
	// Jitter spreads what a fleet of workers does in answer to one event
	// they all see at once. After the owner key is deleted a worker waits
	// a random time in [Jitter/2, 3·Jitter/2) before asking the servers
	// (the successor's put usually arrives first, and then it asks
	// nobody); after a broken watch it tries to watch again within
	// Jitter. The servers see about (workers per app)/Jitter requests per
	// second after an owner dies: raise it with the fleet. Default 100 ms.
	Jitter time.Duration
	// AllowLazyConnect lets Start succeed with no server and no app id;
	// the worker keeps resolving both.
	AllowLazyConnect bool
	// OnChange is called, from the discovery goroutine and in order, each
	// time the current server changes; it must not block.
	OnChange func(old, new Server)
	// OnIsolated is called once when MaxFailedRounds consecutive rounds
	// found no server (PowerJob kills frequent jobs there); it is armed
	// again by the next success. It must not block.
	OnIsolated func()
	// HTTPClient sends the requests; nil means a client of its own.
	HTTPClient *http.Client
	// Logger receives the worker's logs; nil discards them.
	Logger hclog.Logger
	// Registerer, if set, receives the worker's metrics.
	Registerer prometheus.Registerer

	clock clock // nil: real time
}

// DefaultConfig returns a Config with every default filled in; set
// AppName and Servers or Client.
func DefaultConfig() Config {
	return Config{
		Protocol:        coord.ProtocolHTTP,
		Interval:        10 * time.Second,
		PingTimeout:     time.Second,
		RequestTimeout:  3 * time.Second,
		Tries:           3,
		TryPause:        100 * time.Millisecond,
		MaxFailedRounds: 3,
		EtcdGrace:       3 * time.Second,
		Jitter:          100 * time.Millisecond,
	}
}

func (c Config) withDefaults() (Config, error) {
	d := DefaultConfig()
	if err := coord.ValidateName(c.AppName); err != nil {
		return c, fmt.Errorf("worker: %w: AppName (%q): %v", ErrInvalidConfig, c.AppName, err)
	}
	if len(c.Servers) == 0 && c.Client == nil {
		return c, fmt.Errorf("worker: %w: Servers is empty and Client is nil: give at least one", ErrInvalidConfig)
	}
	for _, s := range c.Servers {
		if _, err := serverURL(s); err != nil {
			return c, fmt.Errorf("worker: %w: Servers entry %q: %v", ErrInvalidConfig, s, err)
		}
	}
	if err := coord.ValidatePrefix(c.Prefix); err != nil {
		return c, fmt.Errorf("worker: %w: Prefix (%q): %v", ErrInvalidConfig, c.Prefix, err)
	}
	if c.Protocol == "" {
		c.Protocol = d.Protocol
	}
	for _, f := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"Interval", &c.Interval, d.Interval},
		{"PingTimeout", &c.PingTimeout, d.PingTimeout},
		{"RequestTimeout", &c.RequestTimeout, d.RequestTimeout},
		{"TryPause", &c.TryPause, d.TryPause},
		{"EtcdGrace", &c.EtcdGrace, d.EtcdGrace},
		{"Jitter", &c.Jitter, d.Jitter},
	} {
		if *f.v == 0 {
			*f.v = f.def
		}
		if *f.v < 0 {
			return c, fmt.Errorf("worker: %w: %s (%v) must be positive", ErrInvalidConfig, f.name, *f.v)
		}
	}
	for _, f := range []struct {
		name string
		v    *int
		def  int
	}{{"Tries", &c.Tries, d.Tries}, {"MaxFailedRounds", &c.MaxFailedRounds, d.MaxFailedRounds}} {
		if *f.v == 0 {
			*f.v = f.def
		}
		if *f.v < 0 {
			return c, fmt.Errorf("worker: %w: %s (%d) must be positive", ErrInvalidConfig, f.name, *f.v)
		}
	}
	if c.PingTimeout > c.RequestTimeout {
		return c, fmt.Errorf("worker: %w: PingTimeout (%v) must not exceed RequestTimeout (%v)", ErrInvalidConfig, c.PingTimeout, c.RequestTimeout)
	}
	if c.clock == nil {
		c.clock = realClock{}
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c, nil
}

// serverURL is the base URL of a Servers entry: "host:port" speaks HTTP,
// "http://host:port" and "https://host:port" say which.
func serverURL(s string) (string, error) {
	scheme, hostPort, found := strings.Cut(s, "://")
	if !found {
		scheme, hostPort = "http", s
	}
	if scheme != "http" && scheme != "https" {
		return "", fmt.Errorf("scheme %q: only http and https", scheme)
	}
	if err := validHostPort(hostPort); err != nil {
		return "", err
	}
	return scheme + "://" + hostPort, nil
}

func validHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return err
	}
	if host == "" {
		return errors.New("no host")
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 || strings.Trim(port, "0123456789") != "" {
		return errors.New("bad port")
	}
	// SplitHostPort keeps spaces and control characters in the host: ask
	// the URL parser that every request will go through.
	if u, err := url.Parse("http://" + s + "/"); err != nil || u.Host != s {
		return errors.New("not usable as a URL host")
	}
	return nil
}
