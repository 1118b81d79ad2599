package testutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI is a certificate authority made for one test, with certificates it
// signs written as PEM files under a temporary directory: nothing is
// checked in.
type PKI struct {
	t      testing.TB
	dir    string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	CAFile string
	Pool   *x509.CertPool
}

// NewPKI creates a CA named name.
func NewPKI(t testing.TB, name string) *PKI {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &PKI{t: t, dir: t.TempDir(), ca: ca, caKey: key, Pool: x509.NewCertPool()}
	p.Pool.AddCert(ca)
	p.CAFile = p.write(name+"-ca.pem", "CERTIFICATE", der)
	return p
}

// Issue signs a certificate for commonName valid for serving on loopback
// (127.0.0.1, ::1, localhost) and for client authentication, and returns
// its certificate and key files.
func (p *PKI) Issue(commonName string) (certFile, keyFile string) {
	p.t.Helper()
	key := newKey(p.t)
	tmpl := &x509.Certificate{
		SerialNumber: serial(p.t),
		Subject:      pkix.Name{CommonName: commonName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		p.t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		p.t.Fatal(err)
	}
	return p.write(commonName+".pem", "CERTIFICATE", der), p.write(commonName+"-key.pem", "EC PRIVATE KEY", keyDER)
}

// ClientTLS is a client configuration that trusts this CA and presents a
// certificate for commonName.
func (p *PKI) ClientTLS(commonName string) *tls.Config {
	p.t.Helper()
	certFile, keyFile := p.Issue(commonName)
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		p.t.Fatal(err)
	}
	return &tls.Config{RootCAs: p.Pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
}

func (p *PKI) write(name, typ string, der []byte) string {
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		p.t.Fatal(err)
	}
	return path
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func serial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
