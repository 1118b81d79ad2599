package coord

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"

	"github.com/batonhq/baton/internal/zaplog"
	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
)

// ClientConfig returns the etcd client settings baton recommends for a
// server or worker process: gRPC keepalive pings so that a blackholed
// connection is torn down and redialled instead of hanging, and the
// client's zap logs routed to logger at warn level and above (nil discards
// them). gRPC refuses ping intervals below 10 s (it raises them to 10 s),
// so a dead connection is found after about 12 s; baton's safety never
// waits for that — the session's guard and every call's deadline do not
// depend on it.
//
// Reconnection backs off from 100 ms to at most 1 s (gRPC's default grows
// to 2 minutes): after etcd or the network comes back, a server must be
// confirming its lease again within a second, not whenever its backoff
// says.
func ClientConfig(endpoints []string, logger hclog.Logger) clientv3.Config {
	return clientv3.Config{
		Endpoints:            endpoints,
		DialTimeout:          5 * time.Second,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		// No pings while the client has no stream: etcd answers those with
		// GOAWAY "too_many_pings", and an idle client has nothing to protect.
		PermitWithoutStream: false,
		Logger:              zaplog.New(logger, zapcore.WarnLevel),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   time.Second,
			},
			MinConnectTimeout: 2 * time.Second,
		})},
	}
}

// Dial creates a plaintext, unauthenticated client with ClientConfig; see
// DialConfig.
func Dial(ctx context.Context, endpoints []string, logger hclog.Logger) (*clientv3.Client, error) {
	return DialConfig(ctx, ClientConfig(endpoints, logger))
}

// DialConfig creates a client with cfg — typically ClientConfig's, with
// TLS (see LoadTLS) and Username and Password set — and makes sure etcd
// answers before ctx ends: clientv3.New does not block, so an unreachable
// cluster would otherwise only show up at the first call. When no
// endpoint accepts connections (nothing listens there, say) it fails
// within about a second with the dial error, rather than waiting for ctx;
// wrong credentials fail at once with etcd's error. The caller owns the
// returned client and closes it.
func DialConfig(ctx context.Context, cfg clientv3.Config) (*clientv3.Client, error) {
	endpoints := cfg.Endpoints
	if cfg.Username != "" && cfg.TLS != nil {
		// New logs in, and blocks for its DialTimeout whatever goes
		// wrong: a server certificate this client does not trust is
		// found at once by a handshake of its own.
		if err := tlsRefusal(ctx, endpoints, cfg.TLS, false); err != nil {
			return nil, fmt.Errorf("coord: etcd client for %v: %w", endpoints, err)
		}
	}
	if d, ok := ctx.Deadline(); ok && (cfg.DialTimeout == 0 || time.Until(d) < cfg.DialTimeout) {
		cfg.DialTimeout = max(time.Until(d), time.Millisecond) // New takes no ctx
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		// With credentials, New logs in and a refused client
		// certificate shows only as its deadline: find the refusal.
		if errors.Is(err, context.DeadlineExceeded) {
			diag, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			if tlsErr := tlsRefusal(diag, endpoints, cfg.TLS, true); tlsErr != nil {
				err = tlsErr
			}
			cancel()
		}
		return nil, fmt.Errorf("coord: etcd client for %v: %w", endpoints, err)
	}
	probe, stop := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { failIfUnreachable(probe, stop, cli, endpoints, cfg.TLS) })
	err = Probe(probe, cli)
	stop(nil)
	wg.Wait()
	if err != nil {
		cli.Close()
		if cause := context.Cause(probe); ctx.Err() == nil && cause != nil && !errors.Is(cause, context.Canceled) {
			return nil, cause
		}
		return nil, err
	}
	return cli, nil
}

// failIfUnreachable ends probe with a clear error once the client's
// connection has been failing for a second and no endpoint accepts a TCP
// connection, or every endpoint refuses the client's TLS.
func failIfUnreachable(probe context.Context, stop context.CancelCauseFunc, cli *clientv3.Client, endpoints []string, tlsCfg *tls.Config) {
	err := whileFailing(probe, cli, func(*grpc.ClientConn) error {
		var errs []error
		for _, ep := range endpoints {
			host := ep
			if u, err := url.Parse(ep); err == nil && u.Host != "" {
				host = u.Host
			}
			c, err := (&net.Dialer{Timeout: 500 * time.Millisecond}).DialContext(probe, "tcp", host)
			if err == nil {
				c.Close()
				break // something listens: let the probe go on
			}
			errs = append(errs, err)
		}
		if len(errs) == len(endpoints) {
			return fmt.Errorf("coord: cannot reach etcd at %v: %w", endpoints, errors.Join(errs...))
		}
		if err := tlsRefusal(probe, endpoints, tlsCfg, true); err != nil {
			return fmt.Errorf("coord: etcd at %v: %w", endpoints, err)
		}
		return nil
	})
	if err != nil {
		stop(err)
	}
}

// whileFailing calls diagnose every 100 ms while cli's connection has
// been failing (gRPC's TransientFailure) for a second or more, until ctx
// ends (nil) or diagnose finds the cause (its error).
func whileFailing(ctx context.Context, cli *clientv3.Client, diagnose func(*grpc.ClientConn) error) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var failingSince time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		conn := cli.ActiveConnection()
		if conn.GetState() != connectivity.TransientFailure {
			failingSince = time.Time{}
			continue
		}
		if failingSince.IsZero() {
			failingSince = time.Now()
		}
		if time.Since(failingSince) < time.Second {
			continue
		}
		if err := diagnose(conn); err != nil {
			return err
		}
	}
}

// Probe returns nil once etcd has answered a request that needs a leader,
// or an error when ctx ends first. It lists the members, which needs no
// permission on any key: any etcd user may probe, whatever its role, and
// no permission error is logged.
func Probe(ctx context.Context, cli *clientv3.Client) error {
	if _, err := cli.MemberList(clientv3.WithRequireLeader(ctx)); err != nil {
		return fmt.Errorf("coord: etcd at %v did not answer: %w", cli.Endpoints(), err)
	}
	return nil
}

// LoadTLS builds the TLS configuration of an etcd client from PEM files:
// caFile is the CA that signed the members' certificates (empty: the
// system's roots); certFile and keyFile, both or neither, are the
// client's certificate, for clusters that require client certificates.
func LoadTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("coord: %w: CA file: %v", ErrInvalidConfig, err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("coord: %w: CA file %s holds no PEM certificate", ErrInvalidConfig, caFile)
		}
	}
	if (certFile == "") != (keyFile == "") {
		return nil, fmt.Errorf("coord: %w: a client certificate needs both its cert file and its key file", ErrInvalidConfig)
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("coord: %w: client certificate: %v", ErrInvalidConfig, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// tlsRefusal returns why every endpoint refuses a TLS connection with
// cfg (an untrusted server certificate; with verdict, also a client
// certificate the members do not accept), or nil if one accepts it, or
// without TLS.
func tlsRefusal(ctx context.Context, endpoints []string, cfg *tls.Config, verdict bool) error {
	if cfg == nil {
		return nil
	}
	var errs []error
	for _, ep := range endpoints {
		host := ep
		if u, err := url.Parse(ep); err == nil && u.Host != "" {
			host = u.Host
		}
		err := tlsAccepted(ctx, host, cfg, verdict)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", host, err))
	}
	return errors.Join(errs...)
}

// tlsAccepted completes a TLS handshake with host and, with verdict,
// waits briefly for the server's verdict on the client certificate,
// which TLS 1.3 sends after the handshake: an alert, or silence while it
// waits for the client to speak.
func tlsAccepted(ctx context.Context, host string, cfg *tls.Config, verdict bool) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	cfg = cfg.Clone()
	if cfg.ServerName == "" {
		cfg.ServerName, _, _ = net.SplitHostPort(host)
	}
	conn, err := (&tls.Dialer{NetDialer: &net.Dialer{}, Config: cfg}).DialContext(ctx, "tcp", host)
	if err != nil {
		return err
	}
	defer conn.Close()
	if !verdict {
		return nil
	}
	conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = conn.Read(make([]byte, 1))
	var timeout net.Error
	if errors.As(err, &timeout) && timeout.Timeout() {
		return nil
	}
	return err
}

// stopOnHandshakeFailure ends ctx with the connection's own error once
// cli's connection has been failing for a second with a failed TLS
// handshake (a certificate etcd refuses, or one the client does not
// trust): waiting longer cannot help. Other failures (etcd down, the
// network) are left to ctx.
func stopOnHandshakeFailure(ctx context.Context, stop context.CancelCauseFunc, cli *clientv3.Client) {
	err := whileFailing(ctx, cli, func(conn *grpc.ClientConn) error {
		// A fail-fast call on a failing connection returns the error of
		// its last attempt to connect.
		_, err := pb.NewMaintenanceClient(conn).Status(ctx, &pb.StatusRequest{}, grpc.WaitForReady(false))
		if status.Code(err) == codes.Unavailable && isTLSRefusal(err.Error()) {
			return fmt.Errorf("coord: etcd at %v refuses this client's TLS: %w", cli.Endpoints(), err)
		}
		return nil
	})
	if err != nil {
		stop(err)
	}
}

// isTLSRefusal tells a connection error caused by TLS (a failed handshake,
// a certificate refused by either side) from others.
func isTLSRefusal(msg string) bool {
	return strings.Contains(msg, "handshake") || strings.Contains(msg, "tls: ") || strings.Contains(msg, "x509: ")
}
